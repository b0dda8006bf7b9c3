package devagent

import (
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/volumed/volumed/commands"
)

// sysTree is the fake sysfs in testdata/sys: a virtio disk with a serial
// and a partition, a SCSI disk with a WWID, a bound and an unbound loop
// device, zram, an empty nbd, and two dm devices (one persistent-named).
const sysTree = "testdata/sys"

var (
	treeVDA = commands.Device{Name: "vda", Path: "/dev/vda", Major: 252, Minor: 0, Size: 41943040 * 512,
		Serial: "0d3f5e6a7b8c4d2e9f10", Controller: "virtio4"}
	treeSDA = commands.Device{Name: "sda", Path: "/dev/sda", Major: 8, Minor: 0, Size: 2097152 * 512,
		WWID: "t10.QEMU     QEMU HARDDISK    5e1f0c2a9d8b47c6a3e1", Controller: "2:0:0:0"}
	treeLoop3 = commands.Device{Name: "loop3", Path: "/dev/loop3", Major: 7, Minor: 3, Size: 204800 * 512,
		BackingFile: "/var/lib/volumed/vol-7c9e6679-7425-40de-944b-e07fc1f90ae7.img", DiskSeq: 9, Controller: "loop"}
	treeDM0 = commands.Device{Name: "dm-0", Path: "/dev/dm-0", Major: 254, Minor: 0, Size: 2097152 * 512, Controller: "dm"}
	treeDM1 = commands.Device{Name: "dm-1", Path: "/dev/dm-1", Major: 254, Minor: 1, Size: 4096 * 512, Controller: "dm"}
)

func TestSysfsDisk(t *testing.T) {
	tests := []struct {
		name   string
		ignore func(string) bool
		disk   string
		want   commands.Device
		found  bool
	}{
		{"virtio disk with serial", nil, "vda", treeVDA, true},
		{"scsi disk with wwid", nil, "sda", treeSDA, true},
		{"loop with backing file", nil, "loop3", treeLoop3, true},
		{"unconfigured loop is not a disk", nil, "loop4", commands.Device{}, false},
		{"zram is ignored", nil, "zram0", commands.Device{}, false},
		{"empty nbd is not yet present", nil, "nbd0", commands.Device{}, false},
		{"partition is not a disk", nil, "vda1", commands.Device{}, false},
		{"absent disk", nil, "vdq", commands.Device{}, false},
		{"path traversal", nil, "../devices", commands.Device{}, false},
		{"empty name", nil, "", commands.Device{}, false},
		{"dm device", nil, "dm-0", treeDM0, true},
		{"dm device ignored by dm name", IsPersistentName, "dm-0", commands.Device{}, false},
		{"dm device with other dm name", IsPersistentName, "dm-1", treeDM1, true},
		{"ignored by kernel name", func(n string) bool { return n == "vda" }, "vda", commands.Device{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok, err := Sysfs{Root: sysTree, Ignore: tt.ignore}.Disk(tt.disk)
			if err != nil {
				t.Fatal(err)
			}
			if ok != tt.found || got != tt.want {
				t.Fatalf("Disk(%q) = %+v, %v; want %+v, %v", tt.disk, got, ok, tt.want, tt.found)
			}
		})
	}
}

func TestSysfsDisks(t *testing.T) {
	got, err := Sysfs{Root: sysTree, Ignore: IsPersistentName}.Disks()
	if err != nil {
		t.Fatal(err)
	}
	want := []commands.Device{treeDM1, treeLoop3, treeSDA, treeVDA}
	if len(got) != len(want) {
		t.Fatalf("Disks() = %+v; want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("Disks()[%d] = %+v; want %+v", i, got[i], want[i])
		}
	}
}

// TestSysfsBadTree reads testdata/bad: vdx is fine, vdy has a bad dev
// file, vdz a bad size; the bad ones are reported and left out.
func TestSysfsBadTree(t *testing.T) {
	got, err := Sysfs{Root: "testdata/bad"}.Disks()
	if err == nil {
		t.Fatal("Disks() on a bad tree returned no error")
	}
	if len(got) != 1 || got[0].Name != "vdx" || got[0].Size != 2048*512 {
		t.Fatalf("Disks() = %+v; want only vdx", got)
	}
	for _, name := range []string{"vdy", "vdz"} {
		if _, ok, err := (Sysfs{Root: "testdata/bad"}).Disk(name); err == nil || ok {
			t.Errorf("Disk(%q) = %v, %v; want an error", name, ok, err)
		}
	}
	if _, err := (Sysfs{Root: t.TempDir()}).Disks(); err == nil {
		t.Fatal("Disks() without /sys/block returned no error")
	}
}

// copyTree copies the fake sysfs tree (with its symlinks) into a test
// directory that the test may change.
func copyTree(t testing.TB) string {
	t.Helper()
	dst := t.TempDir()
	if out, err := exec.Command("cp", "-a", sysTree+"/.", dst).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	return dst
}

func BenchmarkScanTestdata(b *testing.B) {
	s := Sysfs{Root: sysTree, Ignore: IsPersistentName}
	for b.Loop() {
		if _, err := s.Disks(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkScanSys(b *testing.B) {
	s := Sysfs{Ignore: IsPersistentName}
	if _, err := s.Disks(); err != nil {
		b.Skipf("no readable /sys/block: %v", err)
	}
	n, _ := filepath.Glob("/sys/block/*")
	b.ReportMetric(float64(len(n)), "disks")
	for b.Loop() {
		if _, err := s.Disks(); err != nil {
			b.Fatal(err)
		}
	}
}
