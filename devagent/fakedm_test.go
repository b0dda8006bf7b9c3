package devagent

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// FakeDM is testdata/fake-dmsetup copied into a test's temporary
// directory, with its state: the stand-in for dmsetup on kernels without
// device-mapper. DMNamer runs it as it would run dmsetup.
type FakeDM struct {
	// Bin is the fake dmsetup's path.
	Bin string
	dir string
}

// NewFakeDM installs a fake dmsetup with no devices.
func NewFakeDM(t testing.TB) *FakeDM {
	t.Helper()
	script, err := os.ReadFile(filepath.Join("testdata", "fake-dmsetup"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	f := &FakeDM{Bin: filepath.Join(dir, "dmsetup"), dir: dir}
	if err := os.WriteFile(f.Bin, script, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "state"), 0o755); err != nil {
		t.Fatal(err)
	}
	return f
}

// SetTable makes a dm device name with table (lines: one per target).
func (f *FakeDM) SetTable(t testing.TB, name, table string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(f.dir, "state", name), []byte(table+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// SetBusy makes removing name fail as for a device held open.
func (f *FakeDM) SetBusy(t testing.TB, name string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(f.dir, "busy-"+name), nil, 0o644); err != nil {
		t.Fatal(err)
	}
}

// Tables returns the active table of every dm device: name → table. It may
// run while the fake runs.
func (f *FakeDM) Tables(t testing.TB) map[string]string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(f.dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".inactive") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(f.dir, "state", e.Name()))
		if os.IsNotExist(err) {
			continue // removed since ReadDir
		}
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = strings.TrimSuffix(string(b), "\n")
	}
	return out
}

// Calls returns the arguments of every run since the last Calls, in order,
// and forgets them.
func (f *FakeDM) Calls(t testing.TB) [][]string {
	t.Helper()
	path := filepath.Join(f.dir, "calls")
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	var calls [][]string
	args := []string{}
	for line := range strings.Lines(string(b)) {
		if line = strings.TrimSuffix(line, "\n"); line == "--end--" {
			calls, args = append(calls, args), []string{}
			continue
		}
		args = append(args, line)
	}
	return calls
}

// WholeDeviceTable is the linear table over all of the block device at
// path, of size bytes, with its numbers taken from the device node.
func WholeDeviceTable(t testing.TB, path string, size int64) string {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		t.Fatalf("%s is not a block device", path)
	}
	return fmt.Sprintf("0 %d linear %d:%d 0", size/512, unix.Major(st.Rdev), unix.Minor(st.Rdev))
}
