package commands

// NATS subjects of the public contract. Command subjects are request/reply;
// the reply is what the REST bridge answers, with the HTTP status in the
// StatusHeader header.
const (
	SubjectCreate     = "volumes.cmd.create"
	SubjectAttach     = "volumes.cmd.attach"
	SubjectAttachRoot = "volumes.cmd.attach-root"
	SubjectDetach     = "volumes.cmd.detach"
	SubjectDelete     = "volumes.cmd.delete"
	// SubjectForceSync runs a reconcile and replies with its summary.
	SubjectForceSync = "volumes.cmd.force-sync"

	// SubjectOpsPrefix prefixes operation events: volumes.ops.<operation_id>.
	SubjectOpsPrefix = "volumes.ops."
	// SubjectDevicesPrefix prefixes device events: devices.<vm_id>.<action>.
	SubjectDevicesPrefix = "devices."

	// StatusHeader carries the HTTP status of a command reply.
	StatusHeader = "Status"
)

// OpSubject is the subject of the events of one operation.
func OpSubject(operationID string) string { return SubjectOpsPrefix + operationID }

// DeviceSubject is the subject of a device event of one VM.
func DeviceSubject(vmID string, action DeviceAction) string {
	return SubjectDevicesPrefix + vmID + "." + string(action)
}
