package kinds

import (
	"context"
	"errors"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/state"
)

// DeviceSizes is the device agent side of a resize.
type DeviceSizes interface {
	// Resized waits until the device of m, on m's VM, shows at least size
	// bytes (a change uevent, or a fresh list) and returns the size it
	// shows; after its timeout it fails with the size last seen.
	Resized(ctx context.Context, m commands.Mapping, size int64) (int64, error)
}

// resize resizes a volume in CloudStack; it is done when CloudStack shows
// the target size, so a lost answer is resolved by asking for the volume.
// An attached volume whose VM has a device agent is done only once its
// device on that VM shows the new size; its mapping then records it (an
// NBD export reads the size at each new connection). Without an agent,
// it is done on CloudStack's answer, and the mapping takes CloudStack's
// size.
type resize struct{ Deps }

func (resize) Type() commands.OpType { return commands.OpResize }

func (k resize) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req commands.ResizeRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	target := req.SizeGiB() * commands.MinVolumeSize
	vol, err := k.volume(ctx, j, req.VolumeID)
	if err != nil {
		return nil, notFoundOr(err, req.VolumeID)
	}
	sized := func(ctx context.Context) (bool, error) {
		var err error
		vol, err = k.volume(ctx, j, req.VolumeID)
		return err == nil && vol.Size == target, notFoundOr(err, req.VolumeID)
	}
	if vol.Size != target || j.Op.Step == StepResizeJob {
		err = asyncCall{
			name: "resizeVolume", requested: StepResizeRequested, job: StepResizeJob,
			done: sized,
			send: func(ctx context.Context) (string, error) {
				return k.CloudStack.ResizeVolume(ctx, req.VolumeID, req.SizeGiB(), req.ShrinkOK)
			},
			result: func(job csapi.Job) {
				if job.Volume != nil {
					vol = *job.Volume
				}
			},
		}.run(ctx, k.Deps, j)
		if err != nil {
			return nil, err
		}
		if vol.Size != target {
			if _, err := sized(ctx); err != nil {
				return nil, err
			}
		}
	}
	resp := &commands.OpResponse{VolumeID: vol.ID, VMID: vol.VMID, Size: vol.Size, Message: "Volume resized"}
	m, err := k.Mappings.Get(ctx, vol.ID)
	switch {
	case errors.Is(err, state.ErrNotFound) || (err == nil && (vol.VMID == "" || m.VMID != vol.VMID)):
		return resp, nil
	case err != nil:
		return nil, engine.ErrStopped
	}
	resp.DevicePath = m.DevicePath
	size := vol.Size
	if k.Sizes != nil && m.DevicePath != "" && k.Devices != nil && k.Devices.HasAgent(ctx, m.VMID) {
		if j.Op.Step != StepResizeDevice {
			j.Op.Step = StepResizeDevice
			if err := j.Save(ctx); err != nil {
				return nil, err
			}
		}
		seen, err := k.Sizes.Resized(ctx, m, vol.Size)
		if ctx.Err() != nil {
			return nil, engine.ErrStopped
		}
		if err != nil {
			return nil, commands.Timeout("CloudStack resized volume %s to %d bytes, but its device %s on VM %s shows %d bytes: %v",
				vol.ID, vol.Size, m.DevicePath, m.VMID, seen, err).
				WithDetail("device_size", seen).WithDetail("cloudstack_size", vol.Size)
		}
		size = seen
		resp.Message = "Volume resized; its device shows the new size"
	}
	if err := k.followSize(ctx, j, m, size); err != nil {
		return nil, err
	}
	return resp, nil
}
