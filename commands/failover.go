package commands

// Failover and rollback: one operation that moves a set of volumes onto a
// (test) VM and starts it, and the one that puts them back. Each step runs
// as a child operation (ParentID set) of an ordinary type, so it is
// journaled, fenced and exactly once like any other; the workflow records
// its plan and progress on the parent (Operation.Workflow).

// Workflow operation types, and the VM power types only workflows create
// (their steps: no command subject takes them).
const (
	OpFailover OpType = "failover"
	OpRollback OpType = "rollback"
	OpStartVM  OpType = "start_vm"
	OpStopVM   OpType = "stop_vm"
)

// Subjects of the workflow commands.
const (
	SubjectFailover = "volumes.cmd.failover"
	SubjectRollback = "volumes.cmd.rollback"
)

// MaxFailoverVolumes bounds the volumes of one failover (root included):
// CloudStack's KVM limit of data disks per VM, plus the root.
const MaxFailoverVolumes = 16

// FailoverRequest is the request of POST /failovers and
// volumes.cmd.failover.
type FailoverRequest struct {
	// VMID is the VM failed over to (stopped; its root disk becomes
	// RootVolumeID).
	VMID string `json:"vm_id"`
	// RootVolumeID is attached to VMID as device 0.
	RootVolumeID string `json:"root_volume_id"`
	// DataVolumeIDs are attached after the root, in this order.
	DataVolumeIDs []string `json:"data_volume_ids"`
	// Test takes a snapshot of every volume first, so a rollback can
	// revert them; a live failover (false) takes none and cannot be
	// rolled back. Default true.
	Test bool `json:"test"`
	// StartVM starts VMID once every volume is on it. Default true.
	StartVM bool `json:"start_vm"`
	// Force moves volumes in use on their host (mounted, open, or exported
	// with NBD clients); without it the failover fails before any step.
	Force bool `json:"force"`
}

// Volumes are the failover's volumes: the root, then the data volumes in
// order.
func (r FailoverRequest) Volumes() []string {
	return append([]string{r.RootVolumeID}, r.DataVolumeIDs...)
}

// RollbackRequest is the request of POST /failovers/{operation_id}/rollback
// and volumes.cmd.rollback.
type RollbackRequest struct {
	// FailoverID is the completed test failover to roll back.
	FailoverID string `json:"failover_id"`
}

// Placement is where a volume was before a failover moved it.
type Placement struct {
	// VMID is the VM it was attached to; "" when it was detached.
	VMID string `json:"vm_id,omitempty"`
	// DeviceID is CloudStack's device id it had there.
	DeviceID *int64 `json:"device_id,omitempty"`
	// ExportName is its NBD export; "" when it had none.
	ExportName string `json:"export_name,omitempty"`
	// ExportReadOnly is whether that export refused writes.
	ExportReadOnly bool `json:"export_read_only,omitempty"`
	// ExportVMID is the host that served the export.
	ExportVMID string `json:"export_vm_id,omitempty"`
}

// Step statuses of a workflow.
const (
	StepPending = "pending"
	StepDone    = "done"
	StepFailed  = "failed"
	StepUndone  = "undone"
	// StepSkipped: an undo step not run because an earlier undo step of
	// its volume failed.
	StepSkipped = "skipped"
)

// WorkflowStep is one step of a failover or a rollback.
type WorkflowStep struct {
	// Name is what the step does: "snapshot", "detach", "attach", "export",
	// "start_vm", "stop_vm", "revert", "delete_snapshot".
	Name string `json:"name"`
	// VolumeID is the volume it moves; "" for a VM's power.
	VolumeID string `json:"volume_id,omitempty"`
	// VMID is the VM it works on.
	VMID string `json:"vm_id,omitempty"`
	// OperationID is the child operation that runs it.
	OperationID string `json:"operation_id,omitempty"`
	// Status is StepPending, StepDone, StepFailed, StepUndone or
	// StepSkipped.
	Status string `json:"status"`
	// Undoes is the index of the forward step this compensating step
	// undoes; nil for a forward step.
	Undoes *int `json:"undoes,omitempty"`
}

// Workflow is a failover's or rollback's plan and progress, recorded on
// its operation before and after each step.
type Workflow struct {
	// Before is where each volume was when the failover began.
	Before map[string]Placement `json:"before,omitempty"`
	// Snapshots maps each volume to the snapshot the failover took.
	Snapshots map[string]string `json:"snapshots,omitempty"`
	// Steps are the forward steps, then any compensating steps.
	Steps []WorkflowStep `json:"steps"`
	// Compensating is true once a step failed for good and the workflow
	// undoes what it did.
	Compensating bool `json:"compensating,omitempty"`
}

// Details keys of a workflow's events and of its end.
const (
	DetailStepsDone   = "steps_done"
	DetailStepsTotal  = "steps_total"
	DetailStep        = "step"
	DetailCompensated = "compensated"
	DetailSteps       = "steps"
	DetailLeft        = "left"
	// DetailFailedStep is the details of the failed step's child: its
	// code, CloudStack error, job, as the child records them.
	DetailFailedStep = "failed_step"
	// DetailSettledAt is when the reconcile found that nothing a workflow
	// not compensated left remains (RFC 3339, UTC): it is no longer
	// reported.
	DetailSettledAt = "settled_at"
	// DetailVolumesGone are the workflow's volumes CloudStack no longer
	// had when the reconcile settled it (deleted since): nothing of the
	// workflow remained on them, and they were not put back.
	DetailVolumesGone = "volumes_gone"
)

// DecodeFailover parses and validates a failover request: vm_id and
// root_volume_id required, data_volume_ids optional (ids normalized, no
// volume twice, at most MaxFailoverVolumes in all); test and start_vm
// default to true, force to false.
func DecodeFailover(data []byte) (FailoverRequest, error) {
	var in struct {
		VMID          string   `json:"vm_id"`
		RootVolumeID  string   `json:"root_volume_id"`
		DataVolumeIDs []string `json:"data_volume_ids"`
		Test          *bool    `json:"test"`
		StartVM       *bool    `json:"start_vm"`
		Force         bool     `json:"force"`
	}
	if err := decodeStrict(data, &in); err != nil {
		return FailoverRequest{}, err
	}
	vm, err := NormalizeVMID(in.VMID)
	if err != nil {
		return FailoverRequest{}, err
	}
	root, err := NormalizeID("root_volume_id", "vol-", in.RootVolumeID)
	if err != nil {
		return FailoverRequest{}, err
	}
	if len(in.DataVolumeIDs)+1 > MaxFailoverVolumes {
		return FailoverRequest{}, Invalid("data_volume_ids", "a failover moves at most %d volumes, root included; got %d",
			MaxFailoverVolumes, len(in.DataVolumeIDs)+1)
	}
	r := FailoverRequest{VMID: vm, RootVolumeID: root, DataVolumeIDs: []string{}, Test: true, StartVM: true, Force: in.Force}
	seen := map[string]bool{root: true}
	for _, id := range in.DataVolumeIDs {
		vol, err := NormalizeID("data_volume_ids", "vol-", id)
		if err != nil {
			return FailoverRequest{}, err
		}
		if seen[vol] {
			return FailoverRequest{}, Invalid("data_volume_ids", "volume %s is named twice", vol).WithDetail("provided_value", vol)
		}
		seen[vol] = true
		r.DataVolumeIDs = append(r.DataVolumeIDs, vol)
	}
	if in.Test != nil {
		r.Test = *in.Test
	}
	if in.StartVM != nil {
		r.StartVM = *in.StartVM
	}
	return r, nil
}

// DecodeRollback parses and validates a rollback request.
func DecodeRollback(data []byte) (RollbackRequest, error) {
	var in RollbackRequest
	if err := decodeStrict(data, &in); err != nil {
		return RollbackRequest{}, err
	}
	id, err := NormalizeID("failover_id", "op-", in.FailoverID)
	if err != nil {
		return RollbackRequest{}, err
	}
	return RollbackRequest{FailoverID: "op-" + id}, nil
}
