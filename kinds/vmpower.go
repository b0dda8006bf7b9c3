package kinds

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/backoff"
)

// Steps of the VM power kinds.
const (
	StepStartVMRequested = "start_vm:requested"
	StepStartVMJob       = "start_vm:job"
	StepStopVMRequested  = "stop_vm:requested"
	StepStopVMJob        = "stop_vm:job"
	StepStopVMForced     = "stop_vm:forced:requested"
	StepStopVMForcedJob  = "stop_vm:forced:job"
)

// CloudStack's VM states the power kinds read.
const (
	VMRunning  = "Running"
	VMStarting = "Starting"
	VMStopped  = "Stopped"
	VMStopping = "Stopping"
)

// DefaultStopGrace is how long stop_vm waits for a graceful stop before
// it forces one.
const DefaultStopGrace = 60 * time.Second

// VMPowerRequest is the request of start_vm and stop_vm, the VM power
// steps of a workflow (no command takes them).
type VMPowerRequest struct {
	// VMID is the VM to start or stop.
	VMID string `json:"vm_id"`
	// Forced stops the VM at once, without the guest's consent.
	Forced bool `json:"forced,omitempty"`
}

// startVM starts a VM: a Running VM is done, a Starting one is waited
// for; a lost answer is settled by the VM's state once it is no longer
// Starting, never sent again blindly.
type startVM struct{ Deps }

func (startVM) Type() commands.OpType { return commands.OpStartVM }

func (k startVM) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req VMPowerRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	resp := &commands.OpResponse{VMID: req.VMID, Message: "VM started"}
	if j.Op.Step == "" {
		vm, err := k.vm(ctx, j, req.VMID)
		switch {
		case err != nil:
			return nil, err
		case vm.State == VMRunning:
			resp.Message = "VM already running"
			return resp, nil
		case vm.State == VMStarting:
			j.Op.Step = StepStartVMRequested // a start is under way: settle it
		}
	}
	err := asyncCall{
		name: "startVirtualMachine", requested: StepStartVMRequested, job: StepStartVMJob,
		done: k.vmSettled(j, req.VMID, VMRunning, VMStarting),
		send: func(ctx context.Context) (string, error) { return k.CloudStack.StartVM(ctx, req.VMID) },
	}.run(ctx, k.Deps, j)
	if err != nil {
		return nil, vmNotFoundOr(err, req.VMID)
	}
	return resp, nil
}

// stopVM stops a VM: a Stopped VM is done; otherwise a graceful stop,
// forced once the grace period (Deps.StopGrace, from this executor's
// start of the wait) passes without the VM Stopped, or at once when the
// request asks. A lost answer is settled by the VM's state once it is no
// longer Stopping.
type stopVM struct{ Deps }

func (stopVM) Type() commands.OpType { return commands.OpStopVM }

func (k stopVM) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req VMPowerRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	resp := &commands.OpResponse{VMID: req.VMID, Message: "VM stopped"}
	stopped := k.vmSettled(j, req.VMID, VMStopped, VMStopping)
	if j.Op.Step == "" {
		done, err := stopped(ctx)
		if err != nil {
			return nil, vmNotFoundOr(err, req.VMID)
		}
		if done {
			resp.Message = "VM already stopped"
			return resp, nil
		}
	}
	forced := asyncCall{
		name: "stopVirtualMachine", requested: StepStopVMForced, job: StepStopVMForcedJob,
		done: stopped,
		send: func(ctx context.Context) (string, error) { return k.CloudStack.StopVM(ctx, req.VMID, true) },
	}
	if req.Forced || j.Op.Step == StepStopVMForced || j.Op.Step == StepStopVMForcedJob {
		if err := forced.run(ctx, k.Deps, j); err != nil {
			return nil, vmNotFoundOr(err, req.VMID)
		}
		return resp, nil
	}
	grace := k.StopGrace
	if grace <= 0 {
		grace = DefaultStopGrace
	}
	graceCtx, cancel := context.WithTimeout(ctx, grace)
	defer cancel()
	err := asyncCall{
		name: "stopVirtualMachine", requested: StepStopVMRequested, job: StepStopVMJob,
		done: stopped,
		send: func(ctx context.Context) (string, error) { return k.CloudStack.StopVM(ctx, req.VMID, false) },
	}.run(graceCtx, k.Deps, j)
	switch {
	case err == nil:
		return resp, nil
	case ctx.Err() != nil, errors.Is(err, engine.ErrLost), errors.Is(err, engine.ErrStopped) && graceCtx.Err() == nil:
		return nil, err
	}
	// Not stopped gracefully within the grace period (or refused): forced.
	k.Log.Info("VM did not stop gracefully; forcing it", "vm_id", req.VMID, "operation_id", j.Op.ID, "err", err)
	j.Op.Step, j.Op.JobID = "", "" // the forced stop records its own steps
	if err := forced.run(ctx, k.Deps, j); err != nil {
		return nil, vmNotFoundOr(err, req.VMID)
	}
	resp.Message = "VM stopped (forced after " + grace.String() + ")"
	return resp, nil
}

// vm asks CloudStack for a VM inside a step.
func (d Deps) vm(ctx context.Context, j *engine.Journal, id string) (csapi.VM, error) {
	var vm csapi.VM
	err := j.Read(ctx, "listVirtualMachines", func(ctx context.Context) error {
		var err error
		vm, err = d.CloudStack.GetVM(ctx, id)
		return err
	})
	return vm, vmNotFoundOr(err, id)
}

// vmMoving paces the reads of a VM that is Starting or Stopping.
var vmMoving = backoff.Policy{Min: 50 * time.Millisecond, Max: 2 * time.Second}

// vmSettled reports whether CloudStack shows the VM in state, once it is
// no longer in moving (Starting, Stopping): a start or stop under way is
// waited for, so it is never judged undone, and sent again, meanwhile.
func (d Deps) vmSettled(j *engine.Journal, id, state, moving string) func(ctx context.Context) (bool, error) {
	return func(ctx context.Context) (bool, error) {
		wait := vmMoving.Start()
		for {
			vm, err := d.vm(ctx, j, id)
			if err != nil || vm.State != moving {
				return err == nil && vm.State == state, err
			}
			if !wait.Wait(ctx, 0) {
				return false, fmt.Errorf("%w: VM %s is %s: %w", engine.ErrStopped, id, moving, context.Cause(ctx))
			}
		}
	}
}

// vmNotFoundOr maps a missing VM to VMNotFound and anything else through
// engine.Failure.
func vmNotFoundOr(err error, vmID string) error {
	if errors.Is(err, csapi.ErrNotFound) {
		return VMNotFound(vmID)
	}
	return engine.Failure(err)
}
