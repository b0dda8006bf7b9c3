package cloudsim

import (
	"bytes"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// sparseFile makes a file of size with data only at the given offsets.
func sparseFile(t *testing.T, path string, size int64, data map[int64][]byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off, b := range data {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
}

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestCopiesStaySparse: cloneFile (reflink, or the extent copy where the
// filesystem has none) and overwriteFile reproduce the content and size
// and allocate no more than the source's data.
func TestCopiesStaySparse(t *testing.T) {
	dir := t.TempDir()
	const size = 1 << 30
	data := map[int64][]byte{0: bytes.Repeat([]byte("a"), 8192), 600 << 20: bytes.Repeat([]byte("b"), 4096), size - 3: []byte("end")}
	src := filepath.Join(dir, "src.img")
	sparseFile(t, src, size, data)
	check := func(path string) {
		t.Helper()
		st, err := os.Stat(path)
		if err != nil || st.Size() != size {
			t.Fatalf("%s: size %v, %v", path, st, err)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for off, want := range data {
			got := make([]byte, len(want))
			if _, err := f.ReadAt(got, off); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("%s at %d: %q, %v", path, off, got, err)
			}
		}
		zero := make([]byte, 4096)
		if _, err := f.ReadAt(zero, 300<<20); err != nil || !bytes.Equal(zero, make([]byte, 4096)) {
			t.Fatalf("%s: a hole reads %q, %v", path, zero[:8], err)
		}
		if a := allocated(t, path); a > 1<<20 {
			t.Fatalf("%s allocates %d bytes for 12 KiB of data", path, a)
		}
	}
	clone := filepath.Join(dir, "clone.img")
	if err := cloneFile(src, clone); err != nil {
		t.Fatal(err)
	}
	check(clone)
	if _, err := os.Stat(clone + ".tmp"); !os.IsNotExist(err) {
		t.Fatalf("temporary file left: %v", err)
	}

	// overwriteFile: a larger, fully written file becomes the source.
	dst := filepath.Join(dir, "dst.img")
	sparseFile(t, dst, 2*size, map[int64][]byte{100 << 20: bytes.Repeat([]byte("x"), 1<<20)})
	before, _ := os.Stat(dst)
	if err := overwriteFile(src, dst); err != nil {
		t.Fatal(err)
	}
	check(dst)
	after, _ := os.Stat(dst)
	if !os.SameFile(before, after) {
		t.Fatal("overwriteFile replaced the file: a loop device bound to it would not see the data")
	}

	if err := cloneFile(filepath.Join(dir, "missing"), filepath.Join(dir, "x")); err == nil {
		t.Fatal("cloneFile of a missing file succeeded")
	}
}

// BenchmarkCloneFile measures a snapshot's copy of a 1 GiB volume holding
// 64 MiB of data in 16 extents (a reflink where the filesystem has one,
// else the extent copy).
func BenchmarkCloneFile(b *testing.B) {
	dir := b.TempDir()
	src := filepath.Join(dir, "src.img")
	f, err := os.Create(src)
	if err != nil {
		b.Fatal(err)
	}
	if err := f.Truncate(1 << 30); err != nil {
		b.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("d"), 4<<20)
	for i := range int64(16) {
		if _, err := f.WriteAt(chunk, i*(64<<20)); err != nil {
			b.Fatal(err)
		}
	}
	f.Close()
	dst := filepath.Join(dir, "dst.img")
	b.SetBytes(64 << 20)
	for b.Loop() {
		if err := cloneFile(src, dst); err != nil {
			b.Fatal(err)
		}
	}
}
