package kinds

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/state"
)

// Names of a workflow's steps (commands.WorkflowStep.Name).
const (
	WfSnapshot       = "snapshot"
	WfDetach         = "detach"
	WfAttach         = "attach"
	WfExport         = "export"
	WfStartVM        = "start_vm"
	WfStopVM         = "stop_vm"
	WfRevert         = "revert"
	WfDeleteSnapshot = "delete_snapshot"
)

// failover moves a set of volumes onto a stopped (test) VM: a snapshot of
// each (a test failover), a detach of each from where it is (its export
// and persistent name end with it), the root attached as device 0 and
// the data volumes in order, then the VM started. Each step is a child
// operation (engine.RunWorkflow); a step that fails for good undoes what
// was done, in reverse order.
type failover struct{ Deps }

var _ engine.Accepter = failover{}

func (failover) Type() commands.OpType { return commands.OpFailover }

func (failover) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "failover", Subject: commands.SubjectFailover}}
}

// Decode reads a failover. Its pre-checks: the VM and every volume known
// to CloudStack (404), no volume on the VM already (409), and, unless
// force, no volume in use on its host (409 naming who).
func (k failover) Decode(_ context.Context, _ string, data []byte) (engine.Command, error) {
	req, err := commands.DecodeFailover(data)
	if err != nil {
		return engine.Command{}, err
	}
	vm := req.VMID
	return engine.Command{VolumeID: req.RootVolumeID, VMID: &vm, VolumeIDs: req.Volumes(), Request: req,
		Check: func(ctx, checkCtx context.Context) error {
			_, err := k.CloudStack.GetVM(checkCtx, req.VMID)
			switch {
			case errors.Is(err, csapi.ErrNotFound):
				return VMNotFound(req.VMID)
			case err != nil && !csapi.IsRetryable(err) && checkCtx.Err() == nil:
				return engine.CloudStackError(err)
			}
			for _, v := range req.Volumes() {
				vol, err := k.CloudStack.GetVolume(checkCtx, v)
				switch {
				case errors.Is(err, csapi.ErrNotFound):
					return engine.VolumeNotFound(v)
				case err != nil && !csapi.IsRetryable(err) && checkCtx.Err() == nil:
					return engine.CloudStackError(err)
				case err == nil && vol.VMID == req.VMID:
					return onTarget(v, req.VMID)
				}
			}
			if req.Force {
				return nil
			}
			for _, v := range req.Volumes() {
				if err := k.Release.CheckFree(ctx, v); err != nil {
					return state.APIError(err)
				}
			}
			return nil
		}}, nil
}

// onTarget refuses a volume already on the failover's VM.
func onTarget(volumeID, vmID string) *commands.Error {
	return commands.Conflict("volume %s is already attached to VM %s, the VM failed over to", volumeID, vmID).
		WithDetail("volume_id", volumeID).WithDetail("vm_id", vmID)
}

func (k failover) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req commands.FailoverRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	if j.Op.Workflow == nil {
		wf, err := k.plan(ctx, j, req)
		if err != nil {
			return nil, err
		}
		j.Op.Workflow = wf // recorded with its first step
	}
	w := workflow{Deps: k.Deps, root: req.RootVolumeID, force: req.Force}
	if err := j.RunWorkflow(ctx, engine.Plan{Child: w.child, Done: w.done, Undo: w.undo, Left: w.left}); err != nil {
		return nil, err
	}
	wf := j.Op.Workflow
	msg := fmt.Sprintf("Failed over %d volume(s) to VM %s", len(req.Volumes()), req.VMID)
	if req.StartVM {
		msg += " and started it"
	}
	return &commands.OpResponse{VolumeID: req.RootVolumeID, VMID: req.VMID, Snapshots: wf.Snapshots, Before: wf.Before,
		Steps: wf.Steps, Message: msg}, nil
}

// plan checks, before any step, that the volumes are free (unless force)
// and the VM Stopped, and records where each volume is and the steps.
// A failure here did nothing: compensated true, no steps.
func (k failover) plan(ctx context.Context, j *engine.Journal, req commands.FailoverRequest) (*commands.Workflow, error) {
	notStarted := func(err error) error {
		var ce *commands.Error
		if !errors.As(err, &ce) {
			return err
		}
		return ce.WithDetail(commands.DetailCompensated, true).WithDetail(commands.DetailSteps, []commands.WorkflowStep{})
	}
	if !req.Force {
		for _, v := range req.Volumes() {
			if err := k.Release.CheckFree(ctx, v); err != nil {
				return nil, notStarted(err)
			}
		}
	}
	vm, err := k.vm(ctx, j, req.VMID)
	if err != nil {
		return nil, notStarted(err)
	}
	if vm.State != VMStopped {
		return nil, notStarted(commands.Conflict("VM %s is %s; a failover needs it Stopped", req.VMID, vm.State).
			WithDetail("vm_id", req.VMID).WithDetail("vm_state", vm.State))
	}
	wf := &commands.Workflow{Before: map[string]commands.Placement{}, Snapshots: map[string]string{}}
	var snaps, detaches, attaches []commands.WorkflowStep
	for _, v := range req.Volumes() {
		vol, err := k.volume(ctx, j, v)
		if err != nil {
			return nil, notStarted(notFoundOr(err, v))
		}
		if vol.VMID == req.VMID {
			return nil, notStarted(onTarget(v, req.VMID))
		}
		p := commands.Placement{VMID: vol.VMID, DeviceID: vol.DeviceID}
		e, err := k.Exports.Record(ctx, v)
		switch {
		case err == nil:
			p.ExportName, p.ExportReadOnly, p.ExportVMID = e.ExportName, e.ReadOnly, e.VMID
		case !errors.Is(err, state.ErrNotFound):
			return nil, fmt.Errorf("%w: export record of %s: %w", engine.ErrStopped, v, err)
		}
		wf.Before[v] = p
		if req.Test {
			snaps = append(snaps, commands.WorkflowStep{Name: WfSnapshot, VolumeID: v})
		}
		if vol.VMID != "" {
			detaches = append(detaches, commands.WorkflowStep{Name: WfDetach, VolumeID: v, VMID: vol.VMID})
		}
		attaches = append(attaches, commands.WorkflowStep{Name: WfAttach, VolumeID: v, VMID: req.VMID})
	}
	wf.Steps = append(append(snaps, detaches...), attaches...)
	if req.StartVM {
		wf.Steps = append(wf.Steps, commands.WorkflowStep{Name: WfStartVM, VMID: req.VMID})
	}
	for i := range wf.Steps {
		wf.Steps[i].Status = commands.StepPending
	}
	return wf, nil
}

// workflow is the kind's part of a failover's or a rollback's run: the
// child of each step, what a done step records, the undo of each.
type workflow struct {
	Deps
	// root is the failover's root volume.
	root string
	// force detaches the failover's volumes even in use.
	force bool
	// graceful stops the VM gracefully first (a rollback); the undo of
	// a start forces it.
	graceful bool
}

// child is the operation that runs wf.Steps[i].
func (w workflow) child(wf *commands.Workflow, i int) (engine.Child, error) {
	s := wf.Steps[i]
	v, vm := s.VolumeID, s.VMID
	before := wf.Before[v]
	switch s.Name {
	case WfSnapshot:
		return engine.Child{Type: commands.OpSnapshot, VolumeID: v, Request: commands.SnapshotRequest{VolumeID: v}}, nil
	case WfDetach:
		// Forward, with the failover's force; an undo, or a rollback,
		// takes the volume off the test VM with force.
		force := w.force || s.Undoes != nil || vm != before.VMID
		return engine.Child{Type: commands.OpDetach, VolumeID: v, VMID: &vm,
			Request: commands.VolumeRequest{VolumeID: v, Force: force}}, nil
	case WfAttach:
		req := commands.AttachRequest{VolumeID: v, VMID: vm}
		back := vm == before.VMID
		switch {
		case back && before.DeviceID != nil && *before.DeviceID == commands.RootDeviceID || !back && v == w.root:
			root := int64(commands.RootDeviceID)
			req.DeviceID, req.AttachAs = &root, commands.AttachAsRoot
		case back && before.DeviceID != nil:
			// Back at the device it had, so that the VM sees its disks
			// in the order they were (the attach takes another when
			// that one is taken meanwhile).
			dev := *before.DeviceID
			req.DeviceID = &dev
		}
		return engine.Child{Type: commands.OpAttach, VolumeID: v, VMID: &vm, Request: req}, nil
	case WfExport:
		return engine.Child{Type: commands.OpExport, VolumeID: v, VMID: &vm,
			Request: commands.ExportRequest{VolumeID: v, ReadOnly: before.ExportReadOnly}}, nil
	case WfStartVM:
		return engine.Child{Type: commands.OpStartVM, VolumeID: w.root, VMID: &vm, Request: VMPowerRequest{VMID: vm}}, nil
	case WfStopVM:
		return engine.Child{Type: commands.OpStopVM, VolumeID: w.root, VMID: &vm,
			Request: VMPowerRequest{VMID: vm, Forced: !w.graceful}}, nil
	case WfRevert:
		return engine.Child{Type: commands.OpRevert, VolumeID: v,
			Request: commands.RevertRequest{VolumeID: v, SnapshotID: wf.Snapshots[v]}}, nil
	case WfDeleteSnapshot:
		return engine.Child{Type: commands.OpDeleteSnapshot, VolumeID: v,
			Request: commands.SnapshotIDRequest{SnapshotID: wf.Snapshots[v]}}, nil
	}
	return engine.Child{}, commands.Internal("workflow step %d: unknown step %q", i, s.Name)
}

// done records the snapshot a snapshot step took: the child's response,
// or, for a child that timed out on a job that took it after all, the
// snapshot its failure or its job's resolution names.
func (workflow) done(wf *commands.Workflow, i int, child commands.Operation) {
	s := wf.Steps[i]
	if s.Name != WfSnapshot {
		return
	}
	id, _ := child.Details["snapshot_id"].(string)
	if child.Response != nil {
		id = child.Response.SnapshotID
	}
	if id == "" {
		return
	}
	if wf.Snapshots == nil {
		wf.Snapshots = map[string]string{}
	}
	wf.Snapshots[s.VolumeID] = id
}

// undo is the undo of a failover's forward step: a start by a forced
// stop, an attach to the VM by a detach, a detach from where the volume
// was by an attach back (as root when it was device 0) and its export
// again, a snapshot by its deletion.
func (workflow) undo(wf *commands.Workflow, i int) []commands.WorkflowStep {
	s := wf.Steps[i]
	before := wf.Before[s.VolumeID]
	switch s.Name {
	case WfStartVM:
		return []commands.WorkflowStep{{Name: WfStopVM, VMID: s.VMID}}
	case WfAttach:
		return []commands.WorkflowStep{{Name: WfDetach, VolumeID: s.VolumeID, VMID: s.VMID}}
	case WfDetach:
		out := []commands.WorkflowStep{{Name: WfAttach, VolumeID: s.VolumeID, VMID: s.VMID}}
		if before.ExportName != "" {
			out = append(out, commands.WorkflowStep{Name: WfExport, VolumeID: s.VolumeID, VMID: before.ExportVMID})
		}
		return out
	case WfSnapshot:
		if wf.Snapshots[s.VolumeID] != "" {
			return []commands.WorkflowStep{{Name: WfDeleteSnapshot, VolumeID: s.VolumeID}}
		}
	}
	return nil
}

// left says what a workflow that ends failed, not compensated, leaves
// where: each volume not where it was before the failover (or without
// its export), each snapshot not deleted, a VM started and not stopped.
// A volume's course is followed from where the workflow found it through
// its done steps.
func (w workflow) left(wf *commands.Workflow) []string {
	type course struct {
		vm                 string
		exported, reverted bool
		revert             bool // the workflow reverts it
	}
	at := map[string]*course{}
	var order []string
	for _, s := range wf.Steps {
		if s.VolumeID == "" || at[s.VolumeID] != nil {
			continue
		}
		before := wf.Before[s.VolumeID]
		c := &course{vm: before.VMID, exported: true}
		for _, o := range wf.Steps {
			if o.VolumeID != s.VolumeID || o.Undoes != nil {
				continue
			}
			switch o.Name {
			case WfDetach:
				if o.VMID != before.VMID {
					c.vm = o.VMID // a rollback finds it on the test VM
				}
			case WfAttach:
				if c.vm == before.VMID && o.VMID == before.VMID {
					c.vm = "" // a rollback finds it detached
				}
			case WfExport:
				c.exported = false
			case WfRevert:
				c.revert = true
			}
		}
		at[s.VolumeID] = c
		order = append(order, s.VolumeID)
	}
	var out []string
	deleted := map[string]bool{}
	vmUp := map[string]bool{}
	for _, s := range wf.Steps {
		if s.Name == WfStopVM && s.Undoes == nil {
			vmUp[s.VMID] = true // a rollback finds it running, maybe
		}
	}
	for _, s := range wf.Steps {
		if s.Status != commands.StepDone && s.Status != commands.StepUndone {
			continue
		}
		c := at[s.VolumeID]
		switch s.Name {
		case WfDetach:
			c.vm, c.exported = "", false
		case WfAttach:
			c.vm = s.VMID
		case WfExport:
			c.exported = true
		case WfRevert:
			c.reverted = true
		case WfDeleteSnapshot:
			deleted[s.VolumeID] = true
		case WfStartVM:
			vmUp[s.VMID] = true
		case WfStopVM:
			vmUp[s.VMID] = false
		}
	}
	for _, v := range order {
		c, before := at[v], wf.Before[v]
		was := wasAt(before)
		switch {
		case c.vm != before.VMID && c.vm == "":
			out = append(out, fmt.Sprintf("volume %s is detached; it was %s", v, was))
		case c.vm != before.VMID:
			out = append(out, fmt.Sprintf("volume %s is attached to VM %s; it was %s", v, c.vm, was))
		case before.ExportName != "" && !c.exported:
			out = append(out, fmt.Sprintf("volume %s is on VM %s but not exported; it was exported as %s", v, c.vm, before.ExportName))
		}
		if c.revert && !c.reverted {
			out = append(out, fmt.Sprintf("volume %s is not reverted to snapshot %s", v, wf.Snapshots[v]))
		}
	}
	for _, v := range order {
		if snap := wf.Snapshots[v]; snap != "" && !deleted[v] {
			out = append(out, fmt.Sprintf("snapshot %s of volume %s is kept", snap, v))
		}
	}
	for _, vm := range slices.Sorted(maps.Keys(vmUp)) {
		if vmUp[vm] {
			out = append(out, fmt.Sprintf("VM %s is not stopped", vm))
		}
	}
	return out
}

// wasAt says where a volume was before the failover, for people.
func wasAt(before commands.Placement) string {
	was := "detached"
	if before.VMID != "" {
		was = "on VM " + before.VMID
	}
	if before.ExportName != "" {
		was += " exported as " + before.ExportName
	}
	return was
}
