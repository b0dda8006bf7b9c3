package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/volumed/volumed/internal/testenv"
)

// backingKinds are the two kinds of export the feature tests run on: a
// regular file, and a loop device on that file (root only), which is what
// the simulator's volumes are.
var backingKinds = []string{"file", "loop"}

// exportOf returns the path to export for kind: the file itself, or a new
// loop device bound to it.
func exportOf(t *testing.T, kind, file string) string {
	t.Helper()
	if kind == "file" {
		return file
	}
	d, _ := loopDevice(t, file)
	return d.Path
}

// TestBlockStatusMatchesHoles: nbdinfo --map (base:allocation through
// NBD_CMD_BLOCK_STATUS) shows exactly the backing file's data and holes,
// for a file and for a loop device on it (found through sysfs and
// LOOP_GET_STATUS64); data written or trimmed through the export shows
// at once; REQ_ONE returns one extent.
func TestBlockStatusMatchesHoles(t *testing.T) {
	requireTools(t, "nbdinfo", "qemu-io")
	requireNbdsh(t)
	const size = 64 * mib
	data := []span{{1 * mib, mib}, {10 * mib, 3 * mib}, {40 * mib, 64 << 10}}
	for _, kind := range backingKinds {
		t.Run(kind, func(t *testing.T) {
			file := sparseFile(t, size, data)
			path := exportOf(t, kind, file) // removed after the server closes
			s := startServer(t)
			setExports(t, s, ExportSpec{Name: "vol00000001", Path: path})
			u := uri(s, "vol00000001")
			if got, want := nbdinfoMap(t, u), wantMap(size, data); !slices.Equal(got, want) {
				t.Fatalf("map %+v, want %+v", got, want)
			}

			mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 50M 1M", "-c", "discard 10M 1M", u)
			after := []span{{1 * mib, mib}, {11 * mib, 2 * mib}, {40 * mib, 64 << 10}, {50 * mib, mib}}
			if got, want := nbdinfoMap(t, u), wantMap(size, after); !slices.Equal(got, want) {
				t.Fatalf("map after a write at 50M and a trim at 10M: %+v, want %+v", got, want)
			}

			out := nbdsh(t, u, `
ext = []
h.block_status(8*1024*1024, 0, lambda ctx, off, entries, err: ext.extend(entries) or 0, nbd.CMD_FLAG_REQ_ONE)
print(ext)
assert ext == [1024*1024, 3], ext
ext = []
h.block_status(3*1024*1024, 512*1024, lambda ctx, off, entries, err: ext.extend(entries) or 0)
assert ext == [512*1024, 3, 1024*1024, 0, 1536*1024, 3], ext
`)
			t.Logf("nbdsh: %s", strings.TrimSpace(out))
		})
	}
}

// TestWriteZeroes: NBD_CMD_WRITE_ZEROES leaves zeroes; without NO_HOLE the
// range becomes a hole in the backing file, with NO_HOLE it stays
// allocated; FAST_ZERO and FUA succeed where zeroing is fast (ext4, loop
// on ext4); the data around is untouched.
func TestWriteZeroes(t *testing.T) {
	requireTools(t, "nbdinfo")
	requireNbdsh(t)
	const size = 16 * mib
	for _, kind := range backingKinds {
		t.Run(kind, func(t *testing.T) {
			orig := pattern(size, 9)
			file := backingFile(t, "vol.img", orig)
			path := exportOf(t, kind, file) // removed after the server closes
			s := startServer(t)
			setExports(t, s, ExportSpec{Name: "vol00000001", Path: path})
			u := uri(s, "vol00000001")
			if info := nbdinfo(t, u); !info[0].CanZero || !info[0].CanFastZero {
				t.Fatalf("nbdinfo: %+v, want can_zero and can_fast_zero", info[0])
			}
			nbdsh(t, u, `
M = 1024*1024
h.zero(M, 1*M)
h.zero(M, 4*M, nbd.CMD_FLAG_NO_HOLE)
h.zero(M, 8*M, nbd.CMD_FLAG_FAST_ZERO)
h.zero(M, 12*M, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
for off in (1*M, 4*M, 8*M, 12*M):
    assert h.pread(M, off) == bytes(M), off
h.flush()
`)
			want := slices.Clone(orig)
			for _, off := range []int{1, 4, 8, 12} {
				clear(want[off*mib : (off+1)*mib])
			}
			fileEquals(t, file, want)
			f, err := os.Open(file)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			for _, tt := range []struct {
				off  int64
				hole bool
			}{{1 * mib, true}, {4 * mib, false}, {8 * mib, true}, {12 * mib, false}} {
				data, err := unix.Seek(int(f.Fd()), tt.off, unix.SEEK_DATA)
				if err != nil {
					t.Fatal(err)
				}
				if isHole := data >= tt.off+mib; isHole != tt.hole {
					t.Errorf("zeroed range at %d MiB: hole %v, want %v (next data at %d)", tt.off/mib, isHole, tt.hole, data)
				}
			}
		})
	}
}

// TestWireErrors: exact errors for requests the CLI clients never send:
// flags a command does not take, block status without a metadata context,
// write-zeroes on a read-only export, an oversized read; an oversized
// write closes the connection before its payload is read.
func TestWireErrors(t *testing.T) {
	s := startServer(t)
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "vol.img", make([]byte, mib))},
		ExportSpec{Name: "vol00000002", Path: backingFile(t, "ro.img", make([]byte, mib)), ReadOnly: true})
	rw, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Fatal(err)
	}
	ro, err := dialWire(t, s.Addr(), "vol00000002")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []uint16{tfWriteZeroes, tfFastZero, tfSendCache, tfCanMultiConn} {
		if rw.flags&want == 0 {
			t.Errorf("read-write flags %#x lack %#x", rw.flags, want)
		}
	}
	if ro.flags&(tfWriteZeroes|tfSendTrim) != 0 {
		t.Errorf("read-only flags %#x offer writes", ro.flags)
	}
	tests := []struct {
		name  string
		c     *wireClient
		typ   uint16
		flags uint16
		off   uint64
		n     uint32
		want  uint32
	}{
		{"read with DF (not offered)", rw, cmdRead, cmdFlagDF, 0, 512, errInval},
		{"read with FUA", rw, cmdRead, cmdFlagFUA, 0, 512, errInval},
		{"read over the maximum block size", rw, cmdRead, 0, 0, maxPayload + 1, errInval},
		{"block status without a context", rw, cmdBlockStatus, 0, 0, 4096, errInval},
		{"write zeroes", rw, cmdWriteZeroes, cmdFlagNoHole | cmdFlagFUA, 0, 4096, 0},
		{"write zeroes past end", rw, cmdWriteZeroes, 0, mib - 512, 4096, errNoSpace},
		{"write zeroes with REQ_ONE", rw, cmdWriteZeroes, cmdFlagReqOne, 0, 4096, errInval},
		{"cache", rw, cmdCache, 0, 0, mib, 0},
		{"cache past end", rw, cmdCache, 0, mib, 1, errInval},
		{"write zeroes read-only", ro, cmdWriteZeroes, 0, 0, 4096, errPerm},
		{"cache read-only", ro, cmdCache, 0, 0, 4096, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			errno, _, err := tt.c.cmd(tt.typ, tt.flags, tt.off, tt.n, nil)
			if err != nil || errno != tt.want {
				t.Fatalf("errno %d, err %v; want %d", errno, err, tt.want)
			}
		})
	}
	// A write header announcing more than the maximum, with no payload:
	// the server must close rather than wait for (or buffer) 32 MiB.
	if _, _, err := rw.cmd(cmdWrite, 0, 0, maxPayload+1, nil); err == nil {
		t.Fatal("oversized write answered; want the connection closed")
	}
}

// TestMultiConn: what one connection writes and has had acknowledged is
// read by another at once, and a flush on the other succeeds (one shared
// descriptor, no server cache: NBD_FLAG_CAN_MULTI_CONN holds).
func TestMultiConn(t *testing.T) {
	s := startServer(t)
	backing := backingFile(t, "vol.img", make([]byte, mib))
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backing})
	a, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Fatal(err)
	}
	b, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		data := pattern(64<<10, byte(i))
		off := uint64(i%16) * (64 << 10)
		if errno, _, err := a.cmd(cmdWrite, 0, off, 64<<10, data); err != nil || errno != 0 {
			t.Fatalf("write: %d %v", errno, err)
		}
		errno, got, err := b.cmd(cmdRead, 0, off, 64<<10, nil)
		if err != nil || errno != 0 || !bytes.Equal(got, data) {
			t.Fatalf("read on the other connection: errno %d err %v equal %v", errno, err, bytes.Equal(got, data))
		}
	}
	if errno, _, err := b.cmd(cmdFlush, 0, 0, 0, nil); err != nil || errno != 0 {
		t.Fatalf("flush: %d %v", errno, err)
	}
}

// TestConnectionLimits: connections over MaxConns are closed at once;
// NBD_OPT_GO on an export at MaxConnsPerExport gets NBD_REP_ERR_POLICY
// while another export is still served.
func TestConnectionLimits(t *testing.T) {
	s := startServerWith(t, Config{MaxConns: 3, MaxConnsPerExport: 2})
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "a.img", make([]byte, mib))},
		ExportSpec{Name: "vol00000002", Path: backingFile(t, "b.img", make([]byte, mib))})
	for range 2 {
		if _, err := dialWire(t, s.Addr(), "vol00000001"); err != nil {
			t.Fatal(err)
		}
	}
	_, err := dialWire(t, s.Addr(), "vol00000001")
	var oe *optError
	if !errors.As(err, &oe) || oe.typ != repErrPolicy {
		t.Fatalf("third client of one export: %v, want NBD_REP_ERR_POLICY", err)
	}
	// The refused client's connection ends; then a third fits overall.
	testenvEventuallyConns(t, s, 2)
	c, err := dialWire(t, s.Addr(), "vol00000002")
	if err != nil {
		t.Fatalf("other export: %v", err)
	}
	if errno, _, err := c.cmd(cmdRead, 0, 0, 512, nil); err != nil || errno != 0 {
		t.Fatalf("read: %d %v", errno, err)
	}
	if _, err := dialWire(t, s.Addr(), "vol00000002"); err == nil {
		t.Fatal("fourth connection accepted over MaxConns 3")
	}
}

// testenvEventuallyConns waits until the server has n connections.
func testenvEventuallyConns(t *testing.T, s *Server, n int) {
	t.Helper()
	testenv.Eventually(t, 5*time.Second, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.conns) == n
	}, "%d connections", n)
}

// TestDeviceIdentity: with ExportSpec.Device and DiskSeq set, only that
// block device is served: through a symlink (a persistent name) it opens;
// a wrong device number, a wrong diskseq (where the kernel has diskseq),
// or a regular file, is refused with ErrWrongDevice and nothing is served.
func TestDeviceIdentity(t *testing.T) {
	file := backingFile(t, "vol.img", pattern(4*mib, 1))
	d, _ := loopDevice(t, file)
	var st unix.Stat_t
	if err := unix.Stat(d.Path, &st); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "vol00000001")
	if err := os.Symlink(d.Path, link); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(d.Path), "diskseq"))
	testenv.Require(t, err == nil, "needs a kernel with diskseq (5.15 or later): %v", err)
	seq, err := strconv.ParseUint(strings.TrimSpace(string(raw)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	s := startServer(t)
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: link, Device: st.Rdev, DiskSeq: seq})
	if got := s.Exports(); len(got) != 1 {
		t.Fatalf("served %+v", got)
	}
	wrong := unix.Mkdev(unix.Major(st.Rdev), unix.Minor(st.Rdev)+1000)
	for _, sp := range []ExportSpec{
		{Name: "vol00000002", Path: link, Device: wrong},
		{Name: "vol00000002", Path: link, Device: st.Rdev, DiskSeq: seq + 1000},
		{Name: "vol00000002", Path: file, Device: st.Rdev},
	} {
		err := s.SetExports(t.Context(), []ExportSpec{sp})
		if !errors.Is(err, ErrWrongDevice) {
			t.Fatalf("%+v: err %v, want ErrWrongDevice", sp, err)
		}
		if got := s.Exports(); len(got) != 0 {
			t.Fatalf("served %+v after a refused spec", got)
		}
	}
}

// TestFastZeroRefused: on a block device that cannot zero without writing
// (no write-zeroes offload: a fault the test machine's devices do not
// have, so a file's backing is marked so), a fast zero that must keep the
// range allocated fails with errSlowZero (ENOTSUP on the wire) and
// changes nothing, and the same request without fast zeroes.
func TestFastZeroRefused(t *testing.T) {
	orig := pattern(mib, 4)
	path := backingFile(t, "vol.img", orig)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := &backing{f: f, block: true, fastZeroFill: false}
	if err := b.zero(0, 64<<10, true, true); !errors.Is(err, errSlowZero) {
		t.Fatalf("fast zero: %v, want errSlowZero", err)
	}
	fileEquals(t, path, orig)
	if err := b.zero(0, 64<<10, true, false); err != nil {
		t.Fatalf("zero without fast: %v", err)
	}
	want := slices.Clone(orig)
	clear(want[:64<<10])
	fileEquals(t, path, want)
	// The last resort, writing zeroes, over more than one shared chunk.
	big := backingFile(t, "big.img", pattern(5*mib, 6))
	bf, err := os.OpenFile(big, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer bf.Close()
	if err := (&backing{f: bf}).writeZeroes(mib/2, 4*mib); err != nil {
		t.Fatal(err)
	}
	want = pattern(5*mib, 6)
	clear(want[mib/2 : mib/2+4*mib])
	fileEquals(t, big, want)
}

// TestClientThatNeverReads: a client that sends reads and never takes the
// replies in is cut once a reply waits WriteTimeout, which frees its
// place on the export (MaxConnsPerExport 1 here) for another client.
func TestClientThatNeverReads(t *testing.T) {
	s := startServerWith(t, Config{MaxConnsPerExport: 1, WriteTimeout: 200 * time.Millisecond})
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "a.img", pattern(32*mib, 3))})
	c, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Fatal(err)
	}
	var h [28]byte
	for i := range 16 {
		binary.BigEndian.PutUint32(h[0:], magicRequest)
		binary.BigEndian.PutUint16(h[6:], cmdRead)
		binary.BigEndian.PutUint64(h[8:], uint64(i))
		binary.BigEndian.PutUint32(h[24:], 32*mib)
		if _, err := c.nc.Write(h[:]); err != nil {
			t.Fatal(err)
		}
	}
	var other *wireClient
	testenv.Eventually(t, 30*time.Second, func() bool {
		other, err = dialWire(t, s.Addr(), "vol00000001")
		return err == nil
	}, "the export free for another client")
	if errno, data, err := other.cmd(cmdRead, 0, 0, 512, nil); err != nil || errno != 0 || !bytes.Equal(data, pattern(32*mib, 3)[:512]) {
		t.Fatalf("read by the other client: errno %d, err %v", errno, err)
	}
}
