package nbd

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// benchSize and benchChunk: 256 MiB in 1 MiB requests.
const (
	benchSize  = 256 * mib
	benchChunk = mib
)

// BenchmarkSequential compares sequential reads and writes through an
// export with the same I/O on the backing file directly: "direct" is
// pread/pwrite and "wire" the same 1 MiB requests, one at a time, over
// loopback TCP; "nbdcopy" is the Debian client with its default
// parallelism through the export, "nbdcopy-direct" the same client on the
// file. Divide the MB/s figures for the ratio.
func BenchmarkSequential(b *testing.B) {
	backing := filepath.Join(b.TempDir(), "vol.img")
	if err := os.WriteFile(backing, pattern(benchSize, 1), 0o600); err != nil {
		b.Fatal(err)
	}
	src := backingFile(b, "src.img", pattern(benchSize, 2))
	s := startServer(b)
	setExports(b, s, ExportSpec{Name: "vol00000001", Path: backing})
	f, err := os.OpenFile(backing, os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	chunk := pattern(benchChunk, 3)

	direct := map[string]func(off int64) error{
		"read":  func(off int64) error { _, err := f.ReadAt(chunk, off); return err },
		"write": func(off int64) error { _, err := f.WriteAt(chunk, off); return err },
	}
	wire := map[string]func(c *wireClient, off int64) (uint32, error){
		"read": func(c *wireClient, off int64) (uint32, error) {
			errno, _, err := c.cmd(cmdRead, 0, uint64(off), benchChunk, nil)
			return errno, err
		},
		"write": func(c *wireClient, off int64) (uint32, error) {
			errno, _, err := c.cmd(cmdWrite, 0, uint64(off), benchChunk, chunk)
			return errno, err
		},
	}
	nbdcopyArgs := map[string][]string{
		"read/nbdcopy":         {uri(s, "vol00000001"), "null:"},
		"write/nbdcopy":        {src, uri(s, "vol00000001")},
		"read/nbdcopy-direct":  {backing, "null:"},
		"write/nbdcopy-direct": {src, backing},
	}
	for _, op := range []string{"read", "write"} {
		b.Run(op+"/direct", func(b *testing.B) {
			b.SetBytes(benchSize)
			for b.Loop() {
				for off := int64(0); off < benchSize; off += benchChunk {
					if err := direct[op](off); err != nil {
						b.Fatal(err)
					}
				}
				if err := f.Sync(); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(op+"/wire", func(b *testing.B) {
			c, err := dialWire(b, s.Addr(), "vol00000001")
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(benchSize)
			for b.Loop() {
				for off := int64(0); off < benchSize; off += benchChunk {
					if errno, err := wire[op](c, off); err != nil || errno != 0 {
						b.Fatal(fmt.Errorf("errno %d: %w", errno, err))
					}
				}
				if errno, _, err := c.cmd(cmdFlush, 0, 0, 0, nil); err != nil || errno != 0 {
					b.Fatal(fmt.Errorf("flush errno %d: %w", errno, err))
				}
			}
		})
		for _, name := range []string{op + "/nbdcopy", op + "/nbdcopy-direct"} {
			b.Run(name, func(b *testing.B) {
				requireTools(b, "nbdcopy")
				b.SetBytes(benchSize)
				for b.Loop() {
					mustRun(b, "nbdcopy", nbdcopyArgs[name]...)
				}
			})
		}
	}
}
