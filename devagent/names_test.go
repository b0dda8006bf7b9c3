package devagent

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestPersistentName(t *testing.T) {
	tests := []struct {
		uuid, want string
		valid      bool
	}{
		{testUUID, "vol7c9e6679", true},
		{"7C9E6679-7425-40DE-944B-E07FC1F90AE7", "vol7c9e6679", true},
		{"abc", "volabc", false},
		{"../../etc/passwd", "vol../../et", false},
	}
	for _, tt := range tests {
		got := PersistentName(tt.uuid)
		if got != tt.want || IsPersistentName(got) != tt.valid {
			t.Errorf("PersistentName(%q) = %q (valid %v), want %q (valid %v)", tt.uuid, got, IsPersistentName(got), tt.want, tt.valid)
		}
	}
	for _, bad := range []string{"", "vol", "vol7c9e667", "vol7c9e66790", "VOL7c9e6679", "vol7C9E6679", "vol7c9e667g", "vol7c9e6679\n", "x/vol7c9e6679"} {
		if IsPersistentName(bad) {
			t.Errorf("IsPersistentName(%q) = true", bad)
		}
	}
}

func TestNamer(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "by-volume") // created by the first Ensure
	n := NewNamer(dir)
	name := PersistentName(testUUID)

	link, err := n.Ensure(name, "/dev/loop7")
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, name); link != want {
		t.Fatalf("Ensure returned %q, want %q", link, want)
	}
	assertLink := func(want string) {
		t.Helper()
		if got, err := os.Readlink(link); err != nil || got != want {
			t.Fatalf("Readlink(%s) = %q, %v; want %q", link, got, err, want)
		}
	}
	assertLink("/dev/loop7")

	// Idempotent: same target, same link, nothing else in the directory.
	if again, err := n.Ensure(name, "/dev/loop7"); err != nil || again != link {
		t.Fatalf("second Ensure = %q, %v", again, err)
	}
	// Replaces a link pointing elsewhere.
	if _, err := n.Ensure(name, "/dev/vdb"); err != nil {
		t.Fatal(err)
	}
	assertLink("/dev/vdb")

	other := PersistentName("5e1f0c2a-9d8b-47c6-a3e1-000000000000")
	if _, err := n.Ensure(other, "/dev/vdc"); err != nil {
		t.Fatal(err)
	}
	// Entries that are not persistent-name symlinks are not listed.
	if err := os.WriteFile(filepath.Join(dir, "vol00000000"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/null", filepath.Join(dir, "notavolume")); err != nil {
		t.Fatal(err)
	}
	got, err := n.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[name] != "/dev/vdb" || got[other] != "/dev/vdc" {
		t.Fatalf("List() = %v", got)
	}

	// A regular file in the way is not replaced, nor removed.
	if _, err := n.Ensure("vol00000000", "/dev/vdd"); !errors.Is(err, ErrNotSymlink) {
		t.Fatalf("Ensure over a regular file = %v, want ErrNotSymlink", err)
	}
	if err := n.Remove("vol00000000"); !errors.Is(err, ErrNotSymlink) {
		t.Fatalf("Remove of a regular file = %v, want ErrNotSymlink", err)
	}

	if err := n.Remove(name); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(link); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("link still there after Remove: %v", err)
	}
	if err := n.Remove(name); err != nil {
		t.Fatalf("second Remove = %v, want nil", err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 3 { // other, vol00000000, notavolume: no temporary leftovers
		t.Fatalf("directory holds %d entries, want 3", len(ents))
	}
}

func TestNamerRejects(t *testing.T) {
	dir := t.TempDir()
	n := NewNamer(dir)
	for _, name := range []string{"", "vol7c9e667", "../vol7c9e6679", "vol7c9e6679/..", "sda"} {
		if _, err := n.Ensure(name, "/dev/vdb"); !errors.Is(err, ErrInvalidName) {
			t.Errorf("Ensure(%q) = %v, want ErrInvalidName", name, err)
		}
		if err := n.Remove(name); !errors.Is(err, ErrInvalidName) {
			t.Errorf("Remove(%q) = %v, want ErrInvalidName", name, err)
		}
	}
	if _, err := n.Ensure("vol7c9e6679", "dev/vdb"); err == nil {
		t.Error("Ensure with a relative device path succeeded")
	}
	if got, err := NewNamer(filepath.Join(dir, "missing")).List(); err != nil || len(got) != 0 {
		t.Errorf("List() of a missing directory = %v, %v", got, err)
	}
	if NewNamer("").Dir() != DefaultNameDir {
		t.Errorf("default Dir = %q", NewNamer("").Dir())
	}
}
