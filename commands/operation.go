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
)

// OpTypes lists every operation type.
var OpTypes = []OpType{OpCreate, OpAttach, OpDetach, OpDelete, OpExport, OpUnexport}

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
	ID       string          `json:"id"`
	Type     OpType          `json:"type"`
	Status   OpStatus        `json:"status"`
	VolumeID string          `json:"volume_id"`
	VMID     *string         `json:"vm_id"`
	Request  json.RawMessage `json:"request"`
	Response *OpResponse     `json:"response,omitempty"`
	// Error is the last error of the operation, the final one when failed.
	Error string `json:"error,omitempty"`
	// Details qualifies Error (cloudstack_error_code, cloudstack_message, …).
	Details map[string]any `json:"details,omitempty"`
	// Step is the last step the handler started, for resuming after a crash.
	Step string `json:"step,omitempty"`
	// JobID is the CloudStack async job of the current step.
	JobID string `json:"cloudstack_job_id,omitempty"`
	// Attempts counts deliveries of the operation to a handler.
	Attempts    int        `json:"attempts,omitempty"`
	CreatedAt   time.Time  `json:"created_at"`
	UpdatedAt   time.Time  `json:"updated_at"`
	CompletedAt *time.Time `json:"completed_at,omitempty"`
}

// OpResponse is the result of a completed operation.
type OpResponse struct {
	VolumeID   string `json:"volume_id,omitempty"`
	VMID       string `json:"vm_id,omitempty"`
	DevicePath string `json:"device_path,omitempty"`
	DeviceID   *int64 `json:"device_id,omitempty"`
	// ExportName is the NBD export an export operation made.
	ExportName string `json:"export_name,omitempty"`
	Message    string `json:"message"`
}

// Duration is how long a terminal operation took; zero otherwise.
func (o *Operation) Duration() time.Duration {
	if o.CompletedAt == nil {
		return 0
	}
	return o.CompletedAt.Sub(o.CreatedAt)
}

// OperationSummary is one row of GET /operations.
type OperationSummary struct {
	ID          string     `json:"id"`
	Type        OpType     `json:"type"`
	Status      OpStatus   `json:"status"`
	VolumeID    string     `json:"volume_id"`
	VMID        *string    `json:"vm_id,omitempty"`
	Error       string     `json:"error,omitempty"`
	CreatedAt   time.Time  `json:"created_at"`
	CompletedAt *time.Time `json:"completed_at,omitempty"`
}

// Summary returns the list row of an operation.
func (o *Operation) Summary() OperationSummary {
	return OperationSummary{ID: o.ID, Type: o.Type, Status: o.Status, VolumeID: o.VolumeID,
		VMID: o.VMID, Error: o.Error, CreatedAt: o.CreatedAt, CompletedAt: o.CompletedAt}
}
