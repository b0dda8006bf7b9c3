package commands

import "time"

// NATS subjects of the public contract. Command subjects are request/reply;
// the reply is what the REST bridge answers, with the HTTP status in the
// StatusHeader header.
const (
	SubjectCreate     = "volumes.cmd.create"
	SubjectAttach     = "volumes.cmd.attach"
	SubjectAttachRoot = "volumes.cmd.attach-root"
	SubjectDetach     = "volumes.cmd.detach"
	SubjectDelete     = "volumes.cmd.delete"
	// SubjectExport and SubjectUnexport start and end a volume's NBD
	// export, served by the instance serving the volume's VM (--vm-id).
	SubjectExport   = "volumes.cmd.export"
	SubjectUnexport = "volumes.cmd.unexport"
	// Snapshots, revert, resize and tags: see OpSnapshot and the others.
	SubjectSnapshot       = "volumes.cmd.snapshot"
	SubjectDeleteSnapshot = "volumes.cmd.delete_snapshot"
	SubjectRevert         = "volumes.cmd.revert"
	SubjectResize         = "volumes.cmd.resize"
	SubjectTags           = "volumes.cmd.tags"
	// SubjectForceSync runs a reconcile and replies with its summary.
	SubjectForceSync = "volumes.cmd.force-sync"

	// SubjectOpsPrefix prefixes operation events: volumes.ops.<operation_id>.
	SubjectOpsPrefix = "volumes.ops."
	// SubjectDevicesPrefix prefixes device events: devices.<vm_id>.<action>.
	SubjectDevicesPrefix = "devices."

	// SubjectMappingsPrefix prefixes mapping updates the device correlator
	// makes by itself, outside an attach (a late device healing a mapping,
	// or a mapping marked missing when its device went away):
	// volumes.mappings.<volume_id>, payload the Mapping JSON.
	SubjectMappingsPrefix = "volumes.mappings."

	// ServiceName is the NATS micro service whose endpoints are the command
	// subjects: `nats micro info volumed` lists them.
	ServiceName = "volumed"

	// StatusHeader carries the HTTP status of a command reply.
	StatusHeader = "Status"
)

// How long the command service takes, at most, to answer: a command (it
// records and queues the operation) and a force-sync (it runs the whole
// reconcile). A requester waits a little longer than these.
const (
	AcceptTimeout    = 8 * time.Second
	ForceSyncTimeout = 2 * time.Minute
)

// OpSubject is the subject of the events of one operation.
func OpSubject(operationID string) string { return SubjectOpsPrefix + operationID }

// DeviceSubject is the subject of a device event of one VM.
func DeviceSubject(vmID string, action DeviceAction) string {
	return SubjectDevicesPrefix + vmID + "." + string(action)
}

// DevicesListSubject is the request/reply subject where a VM's device agent
// answers with the JSON array of its current devices.
func DevicesListSubject(vmID string) string { return SubjectDevicesPrefix + vmID + ".list" }

// DevicesNamesSubject is the request/reply subject where a VM's device
// agent takes the full set of persistent names it must hold.
func DevicesNamesSubject(vmID string) string { return SubjectDevicesPrefix + vmID + ".names" }

// DevicesUsersSubject is the request/reply subject where a VM's device
// agent answers who uses one of its disks (mounts, holders, processes).
func DevicesUsersSubject(vmID string) string { return SubjectDevicesPrefix + vmID + ".users" }

// MappingSubject is the subject of mapping updates of one volume.
func MappingSubject(volumeID string) string { return SubjectMappingsPrefix + volumeID }

// Answer is the answer to a command, the same on NATS (the reply's body,
// its StatusHeader and Retry-After headers) and over REST.
type Answer struct {
	// Status is the HTTP status.
	Status int
	// Body is the JSON of the operation, the result, or the error.
	Body []byte
	// Err is the error answered; nil on success.
	Err *Error
	// RetryAfter is the Retry-After of a 503, in seconds; "" otherwise.
	RetryAfter string
}
