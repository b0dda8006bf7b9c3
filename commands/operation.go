package commands

import (
	"encoding/json"
	"time"
)

// OpType is the kind of an operation. attach-root operations have type
// attach; their request says attach_as "root".
type OpType string

// Operation types.
const (
	OpCreate OpType = "create"
	OpAttach OpType = "attach"
	OpDetach OpType = "detach"
	OpDelete OpType = "delete"
	// OpExport and OpUnexport start and end a volume's NBD export.
	OpExport   OpType = "export"
	OpUnexport OpType = "unexport"
	// OpSnapshot takes a snapshot of a volume; OpDeleteSnapshot deletes
	// one (ordered on its volume); OpRevert reverts a volume to one.
	OpSnapshot       OpType = "snapshot"
	OpDeleteSnapshot OpType = "delete_snapshot"
	OpRevert         OpType = "revert"
	// OpResize resizes a volume; OpTags sets a volume's tags.
	OpResize OpType = "resize"
	OpTags   OpType = "tags"
)

// OpTypes lists every operation type.
var OpTypes = []OpType{OpCreate, OpAttach, OpDetach, OpDelete, OpExport, OpUnexport,
	OpSnapshot, OpDeleteSnapshot, OpRevert, OpResize, OpTags,
	OpFailover, OpRollback, OpStartVM, OpStopVM}

// OpStatus is where an operation is in its life.
type OpStatus string

// Operation statuses. Completed, failed and cancelled are terminal.
const (
	StatusPending   OpStatus = "pending"
	StatusExecuting OpStatus = "executing"
	StatusCompleted OpStatus = "completed"
	StatusFailed    OpStatus = "failed"
	StatusCancelled OpStatus = "cancelled"
)

// OpStatuses lists every operation status.
var OpStatuses = []OpStatus{StatusPending, StatusExecuting, StatusCompleted, StatusFailed, StatusCancelled}

// Terminal reports whether no further change will happen to an operation
// in this status.
func (s OpStatus) Terminal() bool {
	return s == StatusCompleted || s == StatusFailed || s == StatusCancelled
}

// Operation is the record of one accepted command, as the REST API and the
// volumes.ops.<id> events show it.
type Operation struct {
	// ID is "op-" and a UUID.
	ID string `json:"id"`
	// Type is the command the operation runs.
	Type OpType `json:"type"`
	// Status is where the operation is; see OpStatus.
	Status OpStatus `json:"status"`
	// VolumeID is the volume operated on; "" for a create until it exists.
	VolumeID string `json:"volume_id"`
	// VMID is the VM of an attach; null for every other type.
	VMID *string `json:"vm_id"`
	// Request is the accepted request, validated and normalized.
	Request json.RawMessage `json:"request"`
	// Response is the result, set once the operation completed.
	Response *OpResponse `json:"response,omitempty"`
	// Error is the last error of the operation, the final one when failed.
	Error string `json:"error,omitempty"`
	// Details qualifies Error (cloudstack_error_code, cloudstack_message, …).
	Details map[string]any `json:"details,omitempty"`
	// Step is the last step the handler started, for resuming after a crash.
	Step string `json:"step,omitempty"`
	// JobID is the CloudStack async job of the current step.
	JobID string `json:"cloudstack_job_id,omitempty"`
	// Attempts counts deliveries of the operation to a handler.
	Attempts int `json:"attempts,omitempty"`
	// RequestedBy names who asked: "api-token:<name>@<client address>" for
	// REST with a token, "loopback@<client address>" for REST on loopback
	// without one, "nats:operator" for a NATS command (bus.CommandRequester);
	// "" on records written before it existed.
	RequestedBy string `json:"requested_by,omitempty"`
	// ParentID is the failover or rollback this operation is a step of;
	// "" for an operation a command asked for.
	ParentID string `json:"parent_id,omitempty"`
	// VolumeIDs are every volume a failover or rollback names (VolumeID,
	// its root, first): it holds the line of each while it runs. Omitted
	// for an operation on one volume.
	VolumeIDs []string `json:"volume_ids,omitempty"`
	// Workflow is a failover's or rollback's plan and progress.
	Workflow *Workflow `json:"workflow,omitempty"`
	// CreatedAt is when the command was accepted (UTC).
	CreatedAt time.Time `json:"created_at"`
	// UpdatedAt is when the record last changed (UTC).
	UpdatedAt time.Time `json:"updated_at"`
	// CompletedAt is when the operation became terminal; null before.
	CompletedAt *time.Time `json:"completed_at,omitempty"`
	// Revision is the stored record's revision, set by the state store on
	// every read and write; a write must carry the revision it read.
	// Never serialized.
	Revision uint64 `json:"-"`
}

// OpResponse is the result of a completed operation.
type OpResponse struct {
	// VolumeID is the volume operated on (the new one for a create).
	VolumeID string `json:"volume_id,omitempty"`
	// VMID is the VM attached to, detached from or exporting; omitted otherwise.
	VMID string `json:"vm_id,omitempty"`
	// DevicePath is the attached device's path or the exported persistent path.
	DevicePath string `json:"device_path,omitempty"`
	// DeviceID is CloudStack's device id of an attached volume.
	DeviceID *int64 `json:"device_id,omitempty"`
	// ExportName is the NBD export an export operation made.
	ExportName string `json:"export_name,omitempty"`
	// SnapshotID is the snapshot a snapshot operation took, deleted or
	// reverted to.
	SnapshotID string `json:"snapshot_id,omitempty"`
	// Size is the volume's size in bytes after a resize or a revert.
	Size int64 `json:"size,omitempty"`
	// Snapshots maps each volume of a test failover to the snapshot it
	// took (a rollback reverts to them).
	Snapshots map[string]string `json:"snapshots,omitempty"`
	// Before is where each volume of a failover was before it.
	Before map[string]Placement `json:"before,omitempty"`
	// Steps are the steps a failover or rollback ran.
	Steps []WorkflowStep `json:"steps,omitempty"`
	// Message says what was done, e.g. "Volume attached successfully".
	Message string `json:"message"`
}

// VM is the operation's VM id, "" when it has none (VMID null).
func (o *Operation) VM() string {
	if o.VMID == nil {
		return ""
	}
	return *o.VMID
}

// Duration is how long a terminal operation took, between the wall-clock
// times recorded (the same before and after a round trip through JSON);
// zero otherwise.
func (o *Operation) Duration() time.Duration {
	return Took(o.CreatedAt, o.CompletedAt)
}

// Took is the Duration of an operation created and completed at these
// times; zero while it has not completed.
func Took(created time.Time, completed *time.Time) time.Duration {
	if completed == nil {
		return 0
	}
	return completed.Round(0).Sub(created.Round(0))
}

// OperationSummary is one row of GET /operations.
type OperationSummary struct {
	// ID is the operation's id.
	ID string `json:"id"`
	// Type is the command the operation runs.
	Type OpType `json:"type"`
	// Status is where the operation is.
	Status OpStatus `json:"status"`
	// VolumeID is the volume operated on; "" for a create not yet made.
	VolumeID string `json:"volume_id"`
	// VMID is the VM of an attach; omitted for every other type.
	VMID *string `json:"vm_id,omitempty"`
	// Error is the operation's last error; omitted when none.
	Error string `json:"error,omitempty"`
	// CreatedAt is when the command was accepted (UTC).
	CreatedAt time.Time `json:"created_at"`
	// CompletedAt is when the operation became terminal; omitted before.
	CompletedAt *time.Time `json:"completed_at,omitempty"`
}

// Summary returns the list row of an operation.
func (o *Operation) Summary() OperationSummary {
	return OperationSummary{ID: o.ID, Type: o.Type, Status: o.Status, VolumeID: o.VolumeID,
		VMID: o.VMID, Error: o.Error, CreatedAt: o.CreatedAt, CompletedAt: o.CompletedAt}
}

// Details keys of an operation that failed on TIMEOUT while its CloudStack
// job ran, and of the record the reconcile adds once the job's end is
// known (see Resolved).
const (
	// DetailJobMayRun is true while the operation's CloudStack job may
	// still be running, false once the reconcile has resolved it.
	DetailJobMayRun = "job_may_run"
	// DetailJobID is the CloudStack job the operation timed out on.
	DetailJobID = "cloudstack_job_id"
	// DetailJobStatus is how the job ended: JobSucceeded, JobFailed or
	// JobUnknown.
	DetailJobStatus = "job_status"
	// DetailResolvedAt is when the reconcile resolved the job (RFC 3339, UTC).
	DetailResolvedAt = "resolved_at"
	// DetailResolution says in words what became of the job and what was
	// adopted from it.
	DetailResolution = "resolution"
)

// Values of DetailJobStatus.
const (
	// JobSucceeded: CloudStack did what the operation asked.
	JobSucceeded = "succeeded"
	// JobFailed: the job failed; CloudStack did nothing.
	JobFailed = "failed"
	// JobUnknown: CloudStack no longer knows the job and the volume's
	// state does not tell.
	JobUnknown = "unknown"
)

// Resolved reports whether the reconcile has recorded what became of the
// CloudStack job of a failed operation: its details carry
// DetailResolvedAt. Its event then repeats the failed status.
func (o *Operation) Resolved() bool {
	_, ok := o.Details[DetailResolvedAt]
	return ok
}
