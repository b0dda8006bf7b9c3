//go:build linux

package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/devagent/loopdev"
	"github.com/volumed/volumed/internal/testenv"
)

// TestLoopDevice serves a real loop device: nbdcopy writes through it and
// the data reaches the backing file, the size comes from BLKGETSIZE64,
// trim is advertised as the device's queue says and zeroes the range, and
// once the export is removed the device can be deleted (no fd left).
func TestLoopDevice(t *testing.T) {
	testenv.RequireLoopControl(t)
	requireTools(t, "nbdcopy", "nbdinfo")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	backing := backingFile(t, "loop.img", make([]byte, 16*mib))
	d, removed := loopDevice(t, backing)
	s := startServer(t)
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: d.Path})

	info := nbdinfo(t, uri(s, "vol00000001"))
	raw, err := os.ReadFile(filepath.Join("/sys/block", d.Name(), "queue", "discard_max_bytes"))
	if err != nil {
		t.Fatal(err)
	}
	discards := strings.TrimSpace(string(raw)) != "0"
	t.Logf("%s discards: %v", d.Path, discards)
	if len(info) != 1 || info[0].Size != 16*mib || info[0].ReadOnly || info[0].CanTrim != discards {
		t.Fatalf("nbdinfo %+v, want 16 MiB read-write, can_trim=%v", info, discards)
	}

	data := pattern(16*mib, 77)
	mustRun(t, "nbdcopy", "--flush", backingFile(t, "src.img", data), uri(s, "vol00000001"))
	fileEquals(t, backing, data) // nbdcopy's flush reached the backing file

	if discards {
		c, err := dialWire(t, s.Addr(), "vol00000001")
		if err != nil {
			t.Fatal(err)
		}
		if errno, _, err := c.cmd(cmdTrim, 0, mib, mib, nil); err != nil || errno != 0 {
			t.Fatalf("trim: %d %v", errno, err)
		}
		errno, got, err := c.cmd(cmdRead, 0, mib, mib, nil)
		if err != nil || errno != 0 || !bytes.Equal(got, make([]byte, mib)) {
			t.Fatalf("read after trim: errno %d err %v, zeroed %v", errno, err, bytes.Equal(got, make([]byte, mib)))
		}
	}

	setExports(t, s)
	rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
	defer rcancel()
	if err := d.Remove(rctx); err != nil {
		t.Fatalf("loop device still busy after the export was removed: %v", err)
	}
	*removed = true
}

// loopDevice binds a new loop device to backing, removed at cleanup
// unless the test sets *removed.
func loopDevice(t *testing.T, backing string) (*loopdev.Device, *bool) {
	t.Helper()
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := loopdev.Create(ctx, backing)
	if err != nil {
		t.Fatalf("loopdev.Create: %v", err)
	}
	removed := new(bool)
	t.Cleanup(func() {
		if *removed {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := d.Remove(ctx); err != nil {
			t.Errorf("remove %s: %v", d.Path, err)
		}
	})
	return d, removed
}

// TestQemuImgOnSparseLoop: what the benchmark rows do, checked: qemu-img
// sees the holes of a sparse loop-device export (qemu-img map, through
// block status), converts it to a qcow2 holding the same bytes, and
// converts a half-sparse file into the read-write export, after which the
// device holds exactly that file.
func TestQemuImgOnSparseLoop(t *testing.T) {
	requireTools(t, "qemu-img")
	const size = 64 * mib
	data := []span{{2 * mib, mib}, {33 * mib, 2 * mib}}
	file := sparseFile(t, size, data)
	d, _ := loopDevice(t, file)
	s := startServer(t)
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: d.Path})
	u := uri(s, "vol00000001")

	var m []struct {
		Start  uint64 `json:"start"`
		Length uint64 `json:"length"`
		Data   bool   `json:"data"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "qemu-img", "map", "-f", "raw", "--output=json", u)), &m); err != nil {
		t.Fatal(err)
	}
	var got []span
	for _, e := range m {
		if e.Data {
			got = append(got, span{e.Start, e.Length})
		}
	}
	if !slices.Equal(got, data) {
		t.Fatalf("qemu-img map: data at %+v, want %+v", got, data)
	}
	out := filepath.Join(t.TempDir(), "out.qcow2")
	mustRun(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", u, out)
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", file, out)

	src := sparseFile(t, size, []span{{0, 8 * mib}, {16 * mib, 8 * mib}, {48 * mib, mib}})
	mustRun(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, u)
	want, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	fileEquals(t, d.Path, want)
}
