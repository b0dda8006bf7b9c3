package devagent

import (
	"testing"

	"github.com/volumed/volumed/commands"
)

const testUUID = "7c9e6679-7425-40de-944b-e07fc1f90ae7"

func TestVolumeSerial(t *testing.T) {
	tests := []struct{ in, want string }{
		{testUUID, "7c9e6679742540de944b"},
		{"7C9E6679-7425-40DE-944B-E07FC1F90AE7", "7c9e6679742540de944b"},
		{"abc-def", "abcdef"},
		{"", ""},
	}
	for _, tt := range tests {
		if got := VolumeSerial(tt.in); got != tt.want {
			t.Errorf("VolumeSerial(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestMatchesVolume(t *testing.T) {
	tests := []struct {
		name string
		d    commands.Device
		uuid string
		want bool
	}{
		{"virtio serial", commands.Device{Serial: "7c9e6679742540de944b"}, testUUID, true},
		{"virtio serial upper case", commands.Device{Serial: "7C9E6679742540DE944B"}, testUUID, true},
		{"virtio serial of another volume", commands.Device{Serial: "7c9e6679742540de944c"}, testUUID, false},
		{"virtio serial prefix only", commands.Device{Serial: "7c9e6679"}, testUUID, false},
		{"scsi wwid", commands.Device{WWID: "t10.QEMU     QEMU HARDDISK    7c9e6679742540de944b"}, testUUID, true},
		{"scsi wwid of another volume", commands.Device{WWID: "t10.QEMU     QEMU HARDDISK    5e1f0c2a9d8b47c6a3e1"}, testUUID, false},
		{"loop backing file with uuid", commands.Device{BackingFile: "/var/lib/v/vol-" + testUUID + ".img"}, testUUID, true},
		{"loop backing file with serial", commands.Device{BackingFile: "/data/7c9e6679742540de944b.raw"}, testUUID, true},
		{"uuid only in directory", commands.Device{BackingFile: "/data/" + testUUID + "/disk.img"}, testUUID, false},
		{"loop backing file of another volume", commands.Device{BackingFile: "/data/vol-5e1f0c2a-9d8b-47c6-a3e1-000000000000.img"}, testUUID, false},
		{"no identity", commands.Device{Name: "vdb", Size: 1 << 30}, testUUID, false},
		{"empty uuid never matches", commands.Device{Serial: "x", BackingFile: "/x"}, "", false},
		{"not a uuid", commands.Device{WWID: "t10.abc"}, "abc", false},
		{"uuid in upper case", commands.Device{Serial: "7c9e6679742540de944b"}, "7C9E6679-7425-40DE-944B-E07FC1F90AE7", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := MatchesVolume(tt.d, tt.uuid); got != tt.want {
				t.Fatalf("MatchesVolume(%+v, %q) = %v, want %v", tt.d, tt.uuid, got, tt.want)
			}
			if name := PersistentName(tt.uuid); tt.want && !carriesName(tt.d, name) {
				t.Fatalf("carriesName(%+v, %q) = false for a disk of its volume", tt.d, name)
			}
		})
	}
}

func TestCarriesName(t *testing.T) {
	name := PersistentName(testUUID) // vol7c9e6679
	tests := []struct {
		name string
		d    commands.Device
		want bool
	}{
		{"virtio serial", commands.Device{Serial: "7C9E6679742540DE944B"}, true},
		{"virtio serial of another name", commands.Device{Serial: "5e1f0c2a9d8b47c6a3e1"}, false},
		{"serial holding it not first", commands.Device{Serial: "5e1f0c2a7c9e6679"}, false},
		{"scsi wwid", commands.Device{WWID: "t10.QEMU     QEMU HARDDISK    7c9e6679742540de944b"}, true},
		{"nvme nguid with dashes", commands.Device{NGUID: "7c9e6679-7425-40de-944b-e07fc1f90ae7"}, true},
		{"nvme eui-64", commands.Device{EUI: "7c9e6679742540de"}, true},
		{"nvme eui-64 of another name", commands.Device{EUI: "5e1f0c2a9d8b47c6"}, false},
		{"loop backing file", commands.Device{BackingFile: "/var/lib/v/vol-" + testUUID + ".img"}, true},
		{"uuid only in directory", commands.Device{BackingFile: "/data/" + testUUID + "/disk.img"}, false},
		{"no identity", commands.Device{Name: "vdb", Size: 1 << 30}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := carriesName(tt.d, name); got != tt.want {
				t.Fatalf("carriesName(%+v, %q) = %v, want %v", tt.d, name, got, tt.want)
			}
		})
	}
	if carriesName(commands.Device{Serial: "7c9e6679742540de944b"}, "vol7c9e667") {
		t.Error("carriesName holds for a name that is not volXXXXXXXX")
	}
}

func TestHasIdentity(t *testing.T) {
	tests := []struct {
		d    commands.Device
		want bool
	}{
		{commands.Device{Serial: "s"}, true},
		{commands.Device{WWID: "w"}, true},
		{commands.Device{BackingFile: "/var/disks/vol-3f2b7c1e-8a4d-4e6f-9b0a-1c2d3e4f5a6b.img"}, true},
		{commands.Device{BackingFile: "/var/disks/disk-b623953d523d51f4c5e9111a.img"}, false},
		{commands.Device{Name: "vdb", Controller: "virtio4", Size: 1}, false},
	}
	for _, tt := range tests {
		if got := HasIdentity(tt.d); got != tt.want {
			t.Errorf("HasIdentity(%+v) = %v, want %v", tt.d, got, tt.want)
		}
	}
}

func TestUeventIsDiskAndName(t *testing.T) {
	tests := []struct {
		u    Uevent
		disk bool
		name string
	}{
		{Uevent{Subsystem: "block", DevType: "disk", DevName: "loop3", DevPath: "/devices/virtual/block/loop3"}, true, "loop3"},
		{Uevent{Subsystem: "block", DevType: "partition", DevName: "vda1", DevPath: "/devices/x/block/vda/vda1"}, false, "vda1"},
		{Uevent{Subsystem: "bdi", DevPath: "/devices/virtual/bdi/7:3"}, false, "7:3"},
		{Uevent{Subsystem: "block", DevType: "disk", DevPath: "/devices/virtual/block/nbd0"}, true, "nbd0"},
	}
	for _, tt := range tests {
		if got := tt.u.IsDisk(); got != tt.disk {
			t.Errorf("%+v.IsDisk() = %v, want %v", tt.u, got, tt.disk)
		}
		if got := tt.u.Name(); got != tt.name {
			t.Errorf("%+v.Name() = %q, want %q", tt.u, got, tt.name)
		}
	}
}
