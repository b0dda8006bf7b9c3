package commands

import "time"

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
	// Controller names the bus or driver the disk hangs on, e.g. "virtio4".
	Controller string `json:"controller,omitempty"`
	// Seqnum is the kernel uevent SEQNUM; 0 for a device found by a scan.
	Seqnum uint64 `json:"seqnum,omitempty"`
	// Time is when the agent saw the change (UTC).
	Time time.Time `json:"time"`
}

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
