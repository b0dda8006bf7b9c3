//go:build linux

package loopdev

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/volumed/volumed/internal/testenv"
)

// backingFile makes a sparse file of size bytes in a test directory.
func backingFile(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "backing.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// create makes a loop device bound to backing that the test removes.
func create(t *testing.T, ctx context.Context, backing string) *Device {
	t.Helper()
	d, err := Create(ctx, backing)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Remove(context.Background()) })
	return d
}

func sysSize(t *testing.T, d *Device) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", d.Name(), "size"))
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseInt(string(b[:len(b)-1]), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n * 512
}

func TestCreateResizeRemove(t *testing.T) {
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	backing := backingFile(t, 1<<20)
	d := create(t, ctx, backing)

	if got, ok := BackingFile(d.Name()); !ok || got != backing {
		t.Fatalf("BackingFile(%s) = %q, %v; want %q", d.Name(), got, ok, backing)
	}
	if got := sysSize(t, d); got != 1<<20 {
		t.Fatalf("size = %d, want %d", got, 1<<20)
	}
	if err := os.Truncate(backing, 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Resize(); err != nil {
		t.Fatal(err)
	}
	if got := sysSize(t, d); got != 2<<20 {
		t.Fatalf("size after Resize = %d, want %d", got, 2<<20)
	}

	// A Device that does not describe the current device is refused.
	stranger := *d
	stranger.seq, stranger.Backing = "0", "/elsewhere"
	if err := stranger.Remove(ctx); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("Remove of a device set up by someone else = %v, want ErrNotOurs", err)
	}
	if _, ok := BackingFile(d.Name()); !ok {
		t.Fatal("refused Remove still unbound the device")
	}

	if err := d.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join("/sys/block", d.Name())); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s still in /sys/block after Remove: %v", d.Name(), err)
	}
}

func TestAddThenBind(t *testing.T) {
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := Add(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Remove(context.Background()) })
	if got := sysSize(t, d); got != 0 {
		t.Fatalf("unbound size = %d, want 0", got)
	}
	if _, ok := BackingFile(d.Name()); ok {
		t.Fatal("unbound device has a backing file")
	}
	backing := backingFile(t, 3<<20)
	if err := d.Bind(ctx, backing); err != nil {
		t.Fatal(err)
	}
	if got := sysSize(t, d); got != 3<<20 {
		t.Fatalf("bound size = %d, want %d", got, 3<<20)
	}
	if err := d.Remove(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestBindMissingFile(t *testing.T) {
	testenv.RequireLoopControl(t)
	ctx := context.Background()
	d, err := Add(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Remove(ctx) })
	if err := d.Bind(ctx, filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Bind of a missing file = %v, want ErrNotExist", err)
	}
}

// TestLookup: a found device describes the bound device, and its Remove
// refuses once the device was re-bound by someone else.
func TestLookup(t *testing.T) {
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	backing := backingFile(t, 1<<20)
	d := create(t, ctx, backing)
	for _, name := range []string{"sda", "loopx", "loop"} {
		if _, ok := Lookup(name); ok {
			t.Fatalf("Lookup(%q) found a loop device", name)
		}
	}
	found, ok := Lookup(d.Name())
	if !ok || found.Index != d.Index || found.Path != d.Path || found.Backing != backing {
		t.Fatalf("Lookup(%s) = %+v, %v; want %+v", d.Name(), found, ok, d)
	}

	// Someone else re-creates the device and binds another file.
	if err := d.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	other := &Device{Index: d.Index, Path: d.Path}
	if _, err := control(unix.LOOP_CTL_ADD, d.Index); err != nil {
		t.Skipf("index %d taken by another process: %v", d.Index, err)
	}
	t.Cleanup(func() { _ = other.Remove(context.Background()) })
	if err := other.Bind(ctx, backingFile(t, 1<<20)); err != nil {
		t.Fatal(err)
	}
	if err := found.Remove(ctx); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("Remove of a re-created device = %v, want ErrNotOurs", err)
	}
	if _, ok := BackingFile(d.Name()); !ok {
		t.Fatal("refused Remove still unbound the device")
	}
}
