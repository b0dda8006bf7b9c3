package devagent

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/volumed/volumed/commands"
)

func TestParseMountinfo(t *testing.T) {
	f, err := os.Open("testdata/mountinfo/host")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mounts, err := ParseMountinfo(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) != 10 {
		t.Fatalf("%d mounts, want 10: %+v", len(mounts), mounts)
	}
	for _, tc := range []struct {
		i    int
		want Mount
	}{
		{0, Mount{Dev: "259:2", MountPoint: "/", FSType: "ext4", Source: "/dev/nvme0n1p2"}},
		{4, Mount{Dev: "7:3", MountPoint: "/mnt/my disk", FSType: "ext4", Source: "/dev/loop3"}},
		{5, Mount{Dev: "259:7", MountPoint: "/srv/data", FSType: "xfs", Source: "/dev/loop3p1"}}, // optional fields
		{6, Mount{Dev: "0:45", MountPoint: "/home", FSType: "btrfs", Source: "/dev/loop3p2"}},
		{9, Mount{Dev: "7:3", MountPoint: `/mnt/bind\here`, FSType: "ext4", Source: "/dev/loop3"}},
	} {
		if mounts[tc.i] != tc.want {
			t.Errorf("mount %d: %+v, want %+v", tc.i, mounts[tc.i], tc.want)
		}
	}
	for _, bad := range []string{"short", "noseparator"} {
		f, err := os.Open("testdata/mountinfo/" + bad)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseMountinfo(f); err == nil || !strings.Contains(err.Error(), "is not a mount") {
			t.Errorf("%s: err %v, want a refusal", bad, err)
		}
		f.Close()
	}
}

func TestUnescapeMount(t *testing.T) {
	for in, want := range map[string]string{
		`/mnt/a\040b`:    "/mnt/a b",
		`/a\011\012\134`: "/a\t\n\\",
		`/plain`:         "/plain",
		`/end\04`:        `/end\04`,   // too short: kept
		`/not\9999`:      `/not\9999`, // not octal: kept
	} {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q) = %q, want %q", in, got, want)
		}
	}
}

// fakeHost is a sysfs and procfs tree for Usage.
type fakeHost struct {
	t    *testing.T
	root string
}

func newFakeHost(t *testing.T) *fakeHost {
	h := &fakeHost{t: t, root: t.TempDir()}
	mi, err := os.ReadFile("testdata/mountinfo/host")
	if err != nil {
		t.Fatal(err)
	}
	h.file("proc/self/mountinfo", string(mi))
	return h
}

func (h *fakeHost) file(rel, content string) {
	h.t.Helper()
	p := filepath.Join(h.root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		h.t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content+"\n"), 0o644); err != nil {
		h.t.Fatal(err)
	}
}

func (h *fakeHost) link(rel, target string) {
	h.t.Helper()
	p := filepath.Join(h.root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Symlink(target, p); err != nil {
		h.t.Fatal(err)
	}
}

// disk adds /sys/block/<name> with device number num and partitions
// name+"p1".. of numbers parts.
func (h *fakeHost) disk(name, num string, parts ...string) {
	h.file("sys/block/"+name+"/dev", num)
	h.file("sys/block/"+name+"/size", "2048")
	h.file("sys/block/"+name+"/queue/rotational", "0") // a directory that is no partition
	for i, p := range parts {
		part := name + "p" + string(rune('1'+i))
		h.file("sys/block/"+name+"/"+part+"/dev", p)
		h.file("sys/block/"+name+"/"+part+"/partition", string(rune('1'+i)))
	}
}

// proc adds process pid running comm with fds → targets.
func (h *fakeHost) proc(pid, comm string, targets ...string) {
	h.file("proc/"+pid+"/comm", comm)
	if err := os.MkdirAll(filepath.Join(h.root, "proc", pid, "fd"), 0o755); err != nil {
		h.t.Fatal(err)
	}
	for i, target := range targets {
		h.link("proc/"+pid+"/fd/"+string(rune('0'+i)), target)
	}
}

func (h *fakeHost) usage(self int) Usage {
	return Usage{SysRoot: filepath.Join(h.root, "sys"), ProcRoot: filepath.Join(h.root, "proc"), Self: self}
}

func TestUsers(t *testing.T) {
	mount := func(dev, at string) commands.DeviceUser {
		return commands.DeviceUser{Kind: commands.UserMount, Device: dev, MountPoint: at}
	}
	proc := func(pid int, comm, dev string) commands.DeviceUser {
		return commands.DeviceUser{Kind: commands.UserProcess, PID: pid, Command: comm, Device: dev}
	}
	holder := func(dev, h string) commands.DeviceUser {
		return commands.DeviceUser{Kind: commands.UserHolder, Device: dev, Holder: h}
	}
	for _, tc := range []struct {
		name    string
		setup   func(h *fakeHost)
		disk    string
		aliases []string
		self    int
		want    []commands.DeviceUser
	}{
		{
			name:  "free",
			setup: func(h *fakeHost) { h.disk("loop9", "7:9"); h.proc("10", "bash", "/dev/null", "/dev/loop4") },
			disk:  "loop9",
		},
		{
			name:  "mounted disk, bind mount, partitions by number and by source",
			setup: func(h *fakeHost) { h.disk("loop3", "7:3", "259:7", "259:8") },
			disk:  "loop3",
			want: []commands.DeviceUser{mount("/dev/loop3", "/mnt/my disk"), mount("/dev/loop3p1", "/srv/data"),
				mount("/dev/loop3p2", "/home"), mount("/dev/loop3", `/mnt/bind\here`)},
		},
		{
			name: "dm holder of the disk, md holder of a partition",
			setup: func(h *fakeHost) {
				h.disk("vdb", "252:16", "252:17")
				h.file("sys/block/vdb/holders/dm-0/.keep", "")
				h.file("sys/block/dm-0/dm/name", "vg-lv")
				h.file("sys/block/vdb/vdbp1/holders/md127/.keep", "")
			},
			disk: "vdb",
			want: []commands.DeviceUser{holder("/dev/vdb", "dm-0 (vg-lv)"), holder("/dev/vdbp1", "md127")},
		},
		{
			name: "open by processes; self, ended and unrelated ones do not count",
			setup: func(h *fakeHost) {
				h.disk("vdc", "252:32", "252:33")
				h.proc("100", "sleep", "/dev/null", "/dev/vdc", "/dev/vdc") // counted once
				h.proc("200", "dd", "/dev/vdcp1")
				h.proc("300", "volumed", "/dev/vdc") // self
				h.proc("400", "cat", "/dev/vdd", "socket:[123]", "/dev/vdc (deleted)")
				h.proc("500", "qemu-io", "/dev/disk/by-volume/vol12345678")
				h.proc("700", "volumed", "/dev/vdc") // same executable as self: a volumed serving NBD
				h.file("bin/volumed", "binary")
				h.file("bin/sleep", "binary")
				h.link("proc/300/exe", filepath.Join(h.root, "bin/volumed"))
				h.link("proc/700/exe", filepath.Join(h.root, "bin/volumed"))
				h.link("proc/100/exe", filepath.Join(h.root, "bin/sleep"))
				h.file("proc/600/comm", "gone") // no fd directory: ended
				h.proc("notapid", "x", "/dev/vdc")
			},
			disk:    "vdc",
			aliases: []string{"/dev/disk/by-volume/vol12345678"},
			self:    300,
			want:    []commands.DeviceUser{proc(100, "sleep", "/dev/vdc"), proc(200, "dd", "/dev/vdcp1"), proc(500, "qemu-io", "/dev/vdc")},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHost(t)
			tc.setup(h)
			got, err := h.usage(tc.self).Users(tc.disk, tc.aliases...)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("users:\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestUsersErrors(t *testing.T) {
	h := newFakeHost(t)
	h.disk("vdb", "252:16")
	for _, name := range []string{"", "..", "a/b", "vdz"} {
		if _, err := h.usage(0).Users(name); err == nil {
			t.Errorf("Users(%q): no error", name)
		}
	}
	if err := os.Remove(filepath.Join(h.root, "proc/self/mountinfo")); err != nil {
		t.Fatal(err)
	}
	if _, err := h.usage(0).Users("vdb"); err == nil {
		t.Error("no mountinfo: no error")
	}
}

func TestDeviceUserString(t *testing.T) {
	users := []commands.DeviceUser{
		{Kind: commands.UserMount, Device: "/dev/vdb1", MountPoint: "/data"},
		{Kind: commands.UserHolder, Device: "/dev/vdb", Holder: "dm-0 (vg-lv)"},
		{Kind: commands.UserProcess, Device: "/dev/vdb", PID: 42, Command: "sleep"},
		{Kind: commands.UserNBDClient, Export: "vol12345678", Clients: 2},
	}
	want := "/dev/vdb1 mounted on /data; /dev/vdb held by dm-0 (vg-lv); pid 42 (sleep) has /dev/vdb open; NBD export vol12345678 has 2 connected client(s)"
	if got := commands.DeviceUsers(users); got != want {
		t.Fatalf("got %q\nwant %q", got, want)
	}
}
