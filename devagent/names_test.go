package devagent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
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
	ctx := t.Context()
	name := PersistentName(testUUID)

	link, err := n.Ensure(ctx, name, "/dev/loop7")
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
	if again, err := n.Ensure(ctx, name, "/dev/loop7"); err != nil || again != link {
		t.Fatalf("second Ensure = %q, %v", again, err)
	}
	// Replaces a link pointing elsewhere.
	if _, err := n.Ensure(ctx, name, "/dev/vdb"); err != nil {
		t.Fatal(err)
	}
	assertLink("/dev/vdb")

	other := PersistentName("5e1f0c2a-9d8b-47c6-a3e1-000000000000")
	if _, err := n.Ensure(ctx, other, "/dev/vdc"); err != nil {
		t.Fatal(err)
	}
	// Entries that are not persistent-name symlinks are not listed.
	if err := os.WriteFile(filepath.Join(dir, "vol00000000"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/null", filepath.Join(dir, "notavolume")); err != nil {
		t.Fatal(err)
	}
	got, err := n.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[name] != "/dev/vdb" || got[other] != "/dev/vdc" {
		t.Fatalf("List() = %v", got)
	}

	// A regular file in the way is not replaced, nor removed.
	if _, err := n.Ensure(ctx, "vol00000000", "/dev/vdd"); !errors.Is(err, ErrNotSymlink) {
		t.Fatalf("Ensure over a regular file = %v, want ErrNotSymlink", err)
	}
	if err := n.Remove(ctx, "vol00000000"); !errors.Is(err, ErrNotSymlink) {
		t.Fatalf("Remove of a regular file = %v, want ErrNotSymlink", err)
	}

	if err := n.Remove(ctx, name); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(link); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("link still there after Remove: %v", err)
	}
	if err := n.Remove(ctx, name); err != nil {
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
	ctx := t.Context()
	for _, name := range []string{"", "vol7c9e667", "../vol7c9e6679", "vol7c9e6679/..", "sda"} {
		if _, err := n.Ensure(ctx, name, "/dev/vdb"); !errors.Is(err, ErrInvalidName) {
			t.Errorf("Ensure(%q) = %v, want ErrInvalidName", name, err)
		}
		if err := n.Remove(ctx, name); !errors.Is(err, ErrInvalidName) {
			t.Errorf("Remove(%q) = %v, want ErrInvalidName", name, err)
		}
	}
	if _, err := n.Ensure(ctx, "vol7c9e6679", "dev/vdb"); err == nil {
		t.Error("Ensure with a relative device path succeeded")
	}
	if got, err := NewNamer(filepath.Join(dir, "missing")).List(ctx); err != nil || len(got) != 0 {
		t.Errorf("List() of a missing directory = %v, %v", got, err)
	}
	if NewNamer("").Dir() != DefaultNameDir {
		t.Errorf("default Dir = %q", NewNamer("").Dir())
	}
}

// The fake sysfs testdata/sys has sda (8:0, 2097152 sectors), vda (252:0,
// 41943040 sectors) and loop3 (7:3, 204800 sectors); dm-0 is named
// vol1a2b3c4d.
const (
	sdaTable   = "0 2097152 linear 8:0 0"
	vdaTable   = "0 41943040 linear 252:0 0"
	loop3Table = "0 204800 linear 7:3 0"
)

// TestDMNamer runs DMNamer against the fake dmsetup: the real dm path is
// untested here (no device-mapper in these kernels).
func TestDMNamer(t *testing.T) {
	fake := NewFakeDM(t)
	n := NewDMNamer(fake.Bin, sysTree)
	name := PersistentName(testUUID)
	others := map[string]string{
		"vol1a2b3c4d": loop3Table,
		"vol00000001": sdaTable + "\n2097152 8 linear 252:0 0", // two targets
		"vol00000002": "0 8 linear 8:0 0",                      // part of sda
		"vol00000003": "0 8 linear 9:9 0",                      // disk gone
		"data":        vdaTable,                                // not ours
	}
	for name, table := range others {
		fake.SetTable(t, name, table)
	}
	with := func(name, table string) map[string]string {
		m := maps.Clone(others)
		m[name] = table
		return m
	}
	table := []string{"table"}
	for _, step := range []struct {
		name      string
		do        func(ctx context.Context) error
		wantCalls [][]string
		wantState map[string]string
	}{
		{"create", ensure(n, name, "/dev/sda"), [][]string{table, {"create", name, "--table", sdaTable}}, with(name, sdaTable)},
		{"same table kept", ensure(n, name, "/dev/sda"), [][]string{table}, with(name, sdaTable)},
		{"other device reloaded", ensure(n, name, "/dev/vda"),
			[][]string{table, {"reload", name, "--table", vdaTable}, {"resume", name}}, with(name, vdaTable)},
		{"list", func(ctx context.Context) error {
			got, err := n.List(ctx)
			if want := map[string]string{name: "/dev/vda", "vol1a2b3c4d": "/dev/loop3",
				"vol00000001": "", "vol00000002": "", "vol00000003": ""}; err == nil && !maps.Equal(got, want) {
				return fmt.Errorf("List() = %v, want %v", got, want)
			}
			return err
		}, [][]string{table}, with(name, vdaTable)},
		{"remove", func(ctx context.Context) error { return n.Remove(ctx, name) },
			[][]string{table, {"remove", name}}, others},
		{"remove absent", func(ctx context.Context) error { return n.Remove(ctx, name) }, [][]string{table}, others},
	} {
		t.Run(step.name, func(t *testing.T) {
			if err := step.do(t.Context()); err != nil {
				t.Fatal(err)
			}
			if got := fake.Calls(t); !slices.EqualFunc(got, step.wantCalls, slices.Equal) {
				t.Errorf("dmsetup calls %q, want %q", got, step.wantCalls)
			}
			if got := fake.Tables(t); !maps.Equal(got, step.wantState) {
				t.Errorf("dm devices %v, want %v", got, step.wantState)
			}
		})
	}
}

// ensure is a step calling n.Ensure that checks the returned path.
func ensure(n *DMNamer, name, devicePath string) func(context.Context) error {
	return func(ctx context.Context) error {
		path, err := n.Ensure(ctx, name, devicePath)
		if want := "/dev/mapper/" + name; err == nil && path != want {
			return fmt.Errorf("Ensure returned %q, want %q", path, want)
		}
		return err
	}
}

func TestDMNamerFailures(t *testing.T) {
	fake := NewFakeDM(t)
	n := NewDMNamer(fake.Bin, sysTree)
	ctx := t.Context()
	name := PersistentName(testUUID)
	// Refused before any dmsetup run.
	for _, bad := range []string{"", "vol7c9e667", "../vol7c9e6679", "vol7c9e6679 --table x", "-vol7c9e6679", "control"} {
		if _, err := n.Ensure(ctx, bad, "/dev/sda"); !errors.Is(err, ErrInvalidName) {
			t.Errorf("Ensure(%q) = %v, want ErrInvalidName", bad, err)
		}
		if err := n.Remove(ctx, bad); !errors.Is(err, ErrInvalidName) {
			t.Errorf("Remove(%q) = %v, want ErrInvalidName", bad, err)
		}
	}
	for _, dev := range []string{"", "sda", "/dev/", "/dev/../sys/sda", "/dev/disk/sda", "/dev/loop99",
		"/dev/loop4" /* size 0 */, "/dev/zram0", "/dev/vda1" /* a partition */} {
		if _, err := n.Ensure(ctx, name, dev); !errors.Is(err, ErrNotDisk) {
			t.Errorf("Ensure(%s, %q) = %v, want ErrNotDisk", name, dev, err)
		}
	}
	if calls := fake.Calls(t); calls != nil {
		t.Errorf("dmsetup ran for refused input: %q", calls)
	}

	// dmsetup failing: its exit status and message come back.
	fake.SetTable(t, name, sdaTable)
	fake.SetBusy(t, name)
	var exitErr *exec.ExitError
	if err := n.Remove(ctx, name); !errors.As(err, &exitErr) || !strings.Contains(err.Error(), "Device or resource busy") {
		t.Errorf("Remove of a busy device = %v, want dmsetup's exit error and message", err)
	}
	if got := fake.Tables(t); got[name] != sdaTable {
		t.Errorf("busy device gone: %v", got)
	}
	missing := NewDMNamer(filepath.Join(t.TempDir(), "dmsetup"), sysTree)
	if _, err := missing.List(ctx); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("List with no dmsetup = %v, want fs.ErrNotExist", err)
	}
}

// TestDMNamerRealLoop checks the table made for a real loop device from the
// real sysfs, against the fake dmsetup.
func TestDMNamerRealLoop(t *testing.T) {
	d, _ := newLoop(t, 3<<20)
	fake := NewFakeDM(t)
	n := NewDMNamer(fake.Bin, "")
	name := PersistentName(testUUID)
	if _, err := n.Ensure(t.Context(), name, d.Path); err != nil {
		t.Fatal(err)
	}
	want := WholeDeviceTable(t, d.Path, 3<<20)
	if got := fake.Tables(t); got[name] != want {
		t.Fatalf("dm devices %v, want %s: %s", got, name, want)
	}
	if got, err := n.List(t.Context()); err != nil || len(got) != 1 || got[name] != d.Path {
		t.Fatalf("List() = %v, %v; want %s -> %s", got, err, name, d.Path)
	}
}

func TestNewNames(t *testing.T) {
	fake := NewFakeDM(t)
	dir := t.TempDir()
	_, err := os.Stat("/dev/mapper/control")
	haveDM := err == nil
	if DeviceMapperAvailable(filepath.Join(dir, "no-dmsetup")) {
		t.Error("DeviceMapperAvailable with a missing dmsetup")
	}
	if got := DeviceMapperAvailable(fake.Bin); got != haveDM {
		t.Errorf("DeviceMapperAvailable = %v with /dev/mapper/control present %v", got, haveDM)
	}
	names := NewNames(dir, fake.Bin)
	switch n := names.(type) {
	case *DMNamer:
		if !haveDM || n.Dir() != DMDir {
			t.Errorf("NewNames = DMNamer in %s with /dev/mapper/control present %v", n.Dir(), haveDM)
		}
	case *Namer:
		if haveDM || n.Dir() != dir {
			t.Errorf("NewNames = Namer in %s with /dev/mapper/control present %v", n.Dir(), haveDM)
		}
	default:
		t.Errorf("NewNames = %T", names)
	}
}
