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
	Action DeviceAction `json:"action,omitempty"`
	VMID   string       `json:"vm_id,omitempty"`
	// Name is the kernel name, e.g. "vdb" or "loop3".
	Name string `json:"name"`
	// Path is the /dev path, e.g. "/dev/vdb".
	Path  string `json:"device_path"`
	Major int    `json:"major"`
	Minor int    `json:"minor"`
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
	Seqnum uint64    `json:"seqnum,omitempty"`
	Time   time.Time `json:"time"`
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
	ID                   string    `json:"id"`
	VolumeID             string    `json:"volume_id"`
	VMID                 string    `json:"vm_id"`
	DevicePath           string    `json:"device_path"`
	CloudStackState      string    `json:"cloudstack_state"`
	LinuxState           string    `json:"linux_state"`
	Size                 int64     `json:"size"`
	DeviceID             *int64    `json:"cloudstack_device_id,omitempty"`
	PersistentDeviceName string    `json:"persistent_device_name,omitempty"`
	SymlinkPath          string    `json:"symlink_path,omitempty"`
	LastSync             time.Time `json:"last_sync"`
	CreatedAt            time.Time `json:"created_at"`
	UpdatedAt            time.Time `json:"updated_at"`
}
