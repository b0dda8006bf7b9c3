package commands

import (
	"fmt"
	"strings"
	"time"
)

// DeviceAction is what happened to a block device.
type DeviceAction string

// Device actions, as in devices.<vm_id>.<action>.
const (
	DeviceAdd    DeviceAction = "add"
	DeviceRemove DeviceAction = "remove"
	DeviceChange DeviceAction = "change"
)

// Device is a Linux block device as the device agent sees it, and the
// payload of a device event.
type Device struct {
	// Action is what happened to the device; empty outside an event.
	Action DeviceAction `json:"action,omitempty"`
	// VMID is the VM whose device agent reports the device.
	VMID string `json:"vm_id,omitempty"`
	// Name is the kernel name, e.g. "vdb" or "loop3".
	Name string `json:"name"`
	// Path is the /dev path, e.g. "/dev/vdb".
	Path string `json:"device_path"`
	// Major is the device's major number.
	Major int `json:"major"`
	// Minor is the device's minor number.
	Minor int `json:"minor"`
	// Size is in bytes.
	Size int64 `json:"size"`
	// Serial is the virtio serial (/sys/block/X/serial).
	Serial string `json:"serial,omitempty"`
	// WWID is the SCSI WWID (/sys/block/X/device/wwid).
	WWID string `json:"wwid,omitempty"`
	// BackingFile is a loop device's backing file.
	BackingFile string `json:"backing_file,omitempty"`
	// NGUID is an NVMe namespace's NGUID (/sys/block/nvmeXnY/nguid).
	NGUID string `json:"nguid,omitempty"`
	// EUI is an NVMe namespace's EUI-64 (/sys/block/nvmeXnY/eui).
	EUI string `json:"eui,omitempty"`
	// DiskSeq is the kernel's disk sequence number
	// (/sys/block/X/diskseq): every disk the kernel makes, and every new
	// medium of a loop device, gets a new one. 0 on kernels before 5.15.
	DiskSeq uint64 `json:"diskseq,omitempty"`
	// Generation is the agent's number for this appearance of the disk
	// where the kernel shows no DiskSeq: a new one on each add.
	Generation uint64 `json:"generation,omitempty"`
	// Controller names the bus or driver the disk hangs on, e.g. "virtio4".
	Controller string `json:"controller,omitempty"`
	// Seqnum is the kernel uevent SEQNUM; 0 for a device found by a scan.
	Seqnum uint64 `json:"seqnum,omitempty"`
	// Epoch names one run of the agent that emitted an event.
	Epoch string `json:"epoch,omitempty"`
	// EventSeq numbers the events of one Epoch in the order the agent
	// emitted them, from 1; the correlator applies them in that order.
	EventSeq uint64 `json:"event_seq,omitempty"`
	// Time is when the agent saw the change (UTC).
	Time time.Time `json:"time"`
}

// Identity is which appearance of a disk d is: its name, device number
// and DiskSeq (or Generation).
func (d Device) Identity() DeviceIdentity {
	return DeviceIdentity{Name: d.Name, Major: d.Major, Minor: d.Minor, DiskSeq: d.DiskSeq, Generation: d.Generation}
}

// DeviceIdentity tells one appearance of a disk from every other, also
// from a later disk under the same kernel name: the name and major:minor,
// which the kernel reuses, and the kernel's DiskSeq, which it never
// reuses (or, where the kernel has none, the agent's Generation).
type DeviceIdentity struct {
	// Name is the kernel name, e.g. "loop3".
	Name string `json:"name"`
	// Major is the device's major number.
	Major int `json:"major"`
	// Minor is the device's minor number.
	Minor int `json:"minor"`
	// DiskSeq is the kernel's disk sequence number, 0 if none.
	DiskSeq uint64 `json:"diskseq,omitempty"`
	// Generation is the agent's appearance number where DiskSeq is 0.
	Generation uint64 `json:"generation,omitempty"`
}

// String is "name maj:min seq N" (or "gen N"), for logs and errors.
func (i DeviceIdentity) String() string {
	if i.DiskSeq == 0 {
		return fmt.Sprintf("%s %d:%d gen %d", i.Name, i.Major, i.Minor, i.Generation)
	}
	return fmt.Sprintf("%s %d:%d seq %d", i.Name, i.Major, i.Minor, i.DiskSeq)
}

// Path is the disk's /dev path: /dev/<name>, a '!' in the name standing
// for '/'.
func (i DeviceIdentity) Path() string { return "/dev/" + strings.ReplaceAll(i.Name, "!", "/") }

// CloudStack states of a mapping.
const (
	CloudStackAttached = "attached"
)

// Linux states of a mapping.
const (
	LinuxDetected = "detected"
	LinuxMissing  = "missing"
	// LinuxNotApplicable: the VM has no device agent (a remote VM).
	LinuxNotApplicable = "not_applicable"
)

// Mapping records which device a volume became on a VM.
type Mapping struct {
	// ID is the mapping's own id, "mapping-" and a UUID.
	ID string `json:"id"`
	// VolumeID is the mapped CloudStack volume.
	VolumeID string `json:"volume_id"`
	// VMID is the VM the volume is attached to.
	VMID string `json:"vm_id"`
	// DevicePath is the volume's /dev path on the VM, "" when not found.
	DevicePath string `json:"device_path"`
	// CloudStackState is the volume's CloudStack side: CloudStackAttached.
	CloudStackState string `json:"cloudstack_state"`
	// LinuxState is LinuxDetected, LinuxMissing or LinuxNotApplicable.
	LinuxState string `json:"linux_state"`
	// Size is in bytes.
	Size int64 `json:"size"`
	// DeviceID is CloudStack's device id of the volume on the VM.
	DeviceID *int64 `json:"cloudstack_device_id,omitempty"`
	// PersistentDeviceName is "vol" + 8 hex digits of the id, "" until made.
	PersistentDeviceName string `json:"persistent_device_name,omitempty"`
	// DeviceIdentity is the identity of the device at DevicePath when it
	// was recorded; nil when there is none.
	DeviceIdentity *DeviceIdentity `json:"device_identity,omitempty"`
	// SymlinkPath is the persistent name's path on the VM, "" until made.
	SymlinkPath string `json:"symlink_path,omitempty"`
	// LastSync is when the mapping was last checked (UTC).
	LastSync time.Time `json:"last_sync"`
	// CreatedAt is when the mapping was first recorded (UTC).
	CreatedAt time.Time `json:"created_at"`
	// UpdatedAt is when the mapping last changed (UTC).
	UpdatedAt time.Time `json:"updated_at"`
	// Revision is the stored record's revision, set by the state store on
	// every read and write; 0 writes a new mapping. Never serialized.
	Revision uint64 `json:"-"`
}

// Device names the mapping's device path for people: "no device" when it
// has none.
func (m Mapping) Device() string {
	if m.DevicePath == "" {
		return "no device"
	}
	return m.DevicePath
}

// DeviceUser is one holder of a volume's device or export, which makes a
// detach or delete without force a CONFLICT.
type DeviceUser struct {
	// Kind is what holds it: UserMount, UserHolder, UserProcess or
	// UserNBDClient.
	Kind string `json:"kind"`
	// Device is the node held: the disk or one of its partitions.
	Device string `json:"device,omitempty"`
	// MountPoint is where it is mounted (UserMount).
	MountPoint string `json:"mount_point,omitempty"`
	// Holder is the kernel name of the dm or md device over it
	// (UserHolder).
	Holder string `json:"holder,omitempty"`
	// PID and Command are the process holding it open (UserProcess).
	PID     int    `json:"pid,omitempty"`
	Command string `json:"command,omitempty"`
	// Clients counts the connected clients of its NBD export
	// (UserNBDClient), and Export names it.
	Clients int    `json:"clients,omitempty"`
	Export  string `json:"export,omitempty"`
}

// Kinds of DeviceUser.
const (
	UserMount     = "mount"
	UserHolder    = "holder"
	UserProcess   = "process"
	UserNBDClient = "nbd_client"
)

// String names the user for people, e.g. "/dev/loop3p1 mounted on /mnt"
// or "pid 42 (sleep) has /dev/loop3 open".
func (u DeviceUser) String() string {
	switch u.Kind {
	case UserMount:
		return fmt.Sprintf("%s mounted on %s", u.Device, u.MountPoint)
	case UserHolder:
		return fmt.Sprintf("%s held by %s", u.Device, u.Holder)
	case UserProcess:
		return fmt.Sprintf("pid %d (%s) has %s open", u.PID, u.Command, u.Device)
	case UserNBDClient:
		return fmt.Sprintf("NBD export %s has %d connected client(s)", u.Export, u.Clients)
	}
	return u.Kind + " " + u.Device
}

// DeviceUsers lists users for people, separated by "; ".
func DeviceUsers(users []DeviceUser) string {
	s := make([]string, len(users))
	for i, u := range users {
		s[i] = u.String()
	}
	return strings.Join(s, "; ")
}
