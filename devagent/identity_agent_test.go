package devagent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
)

// otherUUID names a second volume's backing file.
const otherUUID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"

// TestAgentReusedNameBetweenScans unbinds a real loop device and binds it
// to another volume's file between two scans, with no uevent delivered:
// the scan reports a remove of the old disk and then an add of the new
// one (never a change), told apart by the kernel's diskseq, in order.
func TestAgentReusedNameBetweenScans(t *testing.T) {
	testenv.RequireLoopControl(t)
	src := newFakeSource()
	a, rec := startAgent(t, Config{Source: src})
	loop, first := newLoop(t, 1<<20)
	src.send(t, Uevent{}, errors.New("no buffer space available")) // rescan
	add := wantEvent(t, rec, first, commands.DeviceAdd)
	if add.DiskSeq == 0 {
		t.Fatalf("add %+v has no diskseq on kernel with /sys/block/X/diskseq", add)
	}

	second := filepath.Join(t.TempDir(), "vol-"+otherUUID+".img")
	if err := os.WriteFile(second, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(second, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := loop.Unbind(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := loop.Bind(ctx, second); err != nil {
		t.Fatal(err)
	}
	src.send(t, Uevent{}, errors.New("no buffer space available")) // rescan
	rm := wantEvent(t, rec, first, commands.DeviceRemove)
	readd := wantEvent(t, rec, second, commands.DeviceAdd)
	switch {
	case rm.Identity() != add.Identity():
		t.Fatalf("remove %v is not of the added disk %v", rm.Identity(), add.Identity())
	case readd.Name != add.Name || readd.DiskSeq == add.DiskSeq:
		t.Fatalf("re-add %v: want the same name with a new diskseq than %v", readd.Identity(), add.Identity())
	case rm.Epoch != readd.Epoch || readd.EventSeq != rm.EventSeq+1 || rm.EventSeq <= add.EventSeq:
		t.Fatalf("event order: add %d, remove %d, add %d (epochs %q %q)", add.EventSeq, rm.EventSeq, readd.EventSeq, rm.Epoch, readd.Epoch)
	case !MatchesVolume(readd, otherUUID) || MatchesVolume(readd, testUUID):
		t.Fatalf("re-added disk %+v has the wrong identity", readd)
	}
	for _, d := range append(rec.of(first), rec.of(second)...) {
		if d.Action == commands.DeviceChange {
			t.Fatalf("a reused name was reported as a change: %+v", d)
		}
	}
	if d, _ := a.Device(loop.Name()); d.Identity() != readd.Identity() {
		t.Fatalf("known %v, want %v", d.Identity(), readd.Identity())
	}
}

// writeDisk writes a fake sysfs disk under root/block/name.
func writeDisk(t *testing.T, root, name string, attrs map[string]string) {
	t.Helper()
	dir := filepath.Join(root, "block", name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for k, v := range attrs {
		if err := os.WriteFile(filepath.Join(dir, k), []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestAgentGenerationWithoutDiskseq runs on a sysfs without diskseq (a
// kernel before 5.15): each add gets a new generation, an add or remove
// uevent of a known disk is a new disk even when sysfs looks the same, a
// new serial under the name is a remove and an add, and a size change is
// a change of the same generation.
func TestAgentGenerationWithoutDiskseq(t *testing.T) {
	root := t.TempDir()
	writeDisk(t, root, "vdb", map[string]string{"dev": "252:16", "size": "2048", "serial": "7c9e6679742540de944b"})
	src := newFakeSource()
	a, rec := startAgent(t, Config{Source: src, SysRoot: root})
	evs := func(n int) []commands.Device {
		t.Helper()
		testenv.Eventually(t, wait, func() bool { return len(rec.of("")) >= n }, "%d events; have %+v", n, rec.of(""))
		return rec.of("")
	}
	first := evs(1)[0]
	if first.Action != commands.DeviceAdd || first.Generation == 0 || first.DiskSeq != 0 {
		t.Fatalf("first event %+v: want an add with a generation", first)
	}

	disk := Uevent{Subsystem: "block", DevType: "disk", DevName: "vdb", Seqnum: 10}
	for i, action := range []string{"remove", "add"} {
		u := disk
		u.Action, u.Seqnum = action, u.Seqnum+uint64(i)
		src.send(t, u, nil)
	}
	got := evs(5)
	want := []commands.DeviceAction{commands.DeviceAdd, commands.DeviceRemove, commands.DeviceAdd, commands.DeviceRemove, commands.DeviceAdd}
	for i, w := range want {
		if got[i].Action != w || got[i].EventSeq != uint64(i+1) {
			t.Fatalf("event %d = %s #%d, want %s #%d: %+v", i, got[i].Action, got[i].EventSeq, w, i+1, got)
		}
	}
	if got[1].Generation != got[0].Generation || got[2].Generation <= got[0].Generation || got[4].Generation <= got[2].Generation {
		t.Fatalf("generations %d %d %d %d %d", got[0].Generation, got[1].Generation, got[2].Generation, got[3].Generation, got[4].Generation)
	}

	writeDisk(t, root, "vdb", map[string]string{"size": "4096"})
	src.send(t, Uevent{}, errors.New("overflow"))
	got = evs(6)
	if got[5].Action != commands.DeviceChange || got[5].Generation != got[4].Generation {
		t.Fatalf("size change = %+v, want a change of generation %d", got[5], got[4].Generation)
	}
	writeDisk(t, root, "vdb", map[string]string{"serial": "3f2504e04f8941d39a0c"})
	src.send(t, Uevent{}, errors.New("overflow"))
	got = evs(8)
	if got[6].Action != commands.DeviceRemove || got[6].Serial != "7c9e6679742540de944b" ||
		got[7].Action != commands.DeviceAdd || got[7].Serial != "3f2504e04f8941d39a0c" || got[7].Generation <= got[4].Generation {
		t.Fatalf("new serial under vdb: %+v", got[6:])
	}
	if d, _ := a.Device("vdb"); d.Generation != got[7].Generation {
		t.Fatalf("known generation %d, want %d", d.Generation, got[7].Generation)
	}
}

// TestSysfsNVMe reads NVMe namespaces from testdata/nvme: the controller
// serial, WWID, NGUID and EUI-64 (as the kernel shows it: bytes apart,
// "7c 9e 66 ...") and the diskseq, and matches them. nvme1n1, on a
// controller with QEMU's serial, carries its volume's EUI-64 only.
func TestSysfsNVMe(t *testing.T) {
	s := Sysfs{Root: "testdata/nvme"}
	d, ok, err := s.Disk("nvme0n1")
	if err != nil || !ok {
		t.Fatalf("Disk(nvme0n1) = %v, %v", ok, err)
	}
	want := commands.Device{Name: "nvme0n1", Path: "/dev/nvme0n1", Major: 259, Minor: 0, Size: 2097152 * 512,
		Serial: "7c9e6679742540de944b", WWID: "uuid.7c9e6679-7425-40de-944b-e07fc1f90ae7",
		NGUID: "7c9e6679-7425-40de-944b-e07fc1f90ae7", EUI: "7c 9e 66 79 74 25 40 de", DiskSeq: 17, Controller: "nvme0"}
	if d != want {
		t.Fatalf("Disk(nvme0n1) = %+v\nwant %+v", d, want)
	}
	tests := []struct {
		name string
		dev  commands.Device
		vol  string
		want bool
	}{
		{"controller serial", commands.Device{Serial: want.Serial}, testUUID, true},
		{"namespace wwid", commands.Device{WWID: want.WWID}, testUUID, true},
		{"nguid", commands.Device{NGUID: want.NGUID}, testUUID, true},
		{"nguid without dashes", commands.Device{NGUID: "7C9E6679742540DE944BE07FC1F90AE7"}, testUUID, true},
		{"eui-64", commands.Device{EUI: want.EUI}, testUUID, true},
		{"eui-64 without spaces", commands.Device{EUI: "7c9e6679742540de"}, testUUID, true},
		{"eui-64 of another volume", commands.Device{EUI: "3f 25 04 e0 4f 89 41 d3"}, testUUID, false},
		{"nguid of another volume", commands.Device{NGUID: otherUUID}, testUUID, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := MatchesVolume(tt.dev, tt.vol); got != tt.want {
				t.Fatalf("MatchesVolume(%+v, %s) = %v", tt.dev, tt.vol, got)
			}
			if !HasIdentity(tt.dev) {
				t.Fatalf("HasIdentity(%+v) = false", tt.dev)
			}
		})
	}
	other, ok, err := s.Disk("nvme1n1")
	if err != nil || !ok || other.EUI != "3f 25 04 e0 4f 89 41 d3" || other.DiskSeq != 18 || MatchesVolume(other, testUUID) {
		t.Fatalf("Disk(nvme1n1) = %+v, %v, %v", other, ok, err)
	}
	if !MatchesVolume(other, otherUUID) || !carriesName(other, PersistentName(otherUUID)) {
		t.Fatalf("Disk(nvme1n1) = %+v: not matched to its volume %s by its EUI-64", other, otherUUID)
	}
}
