package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/state"
)

// Steps of the release sequence, recorded on the operation that runs it.
const (
	// StepUnexport: the volume's NBD export is being ended.
	StepUnexport = "detach:unexport"
	// StepRelease: the device agent is letting go of the volume's device.
	StepRelease = "detach:release"
)

// Devices is the device agent side of attach and release.
type Devices interface {
	// HasAgent reports whether vmID has a device agent whose devices can
	// be correlated.
	HasAgent(ctx context.Context, vmID string) bool
	// Attached waits for the device of a volume just attached; want holds
	// the volume, VM, size and CloudStack device id. It returns the mapping
	// to record (device path, linux state, size, persistent name); after
	// its timeout it fails, returning a mapping with linux_state missing to
	// record all the same.
	Attached(ctx context.Context, want commands.Mapping, since time.Time) (commands.Mapping, error)
	// Detached releases what the volume had on its VM (persistent name)
	// once its device is gone or after a timeout; a device still there
	// then is an error wrapping ErrDevicePresent.
	Detached(ctx context.Context, m commands.Mapping) error
}

// ErrDevicePresent: the kernel of the volume's VM still shows its device.
var ErrDevicePresent = errors.New("the device is still on its VM")

// UseChecker tells who uses a volume's device or export.
type UseChecker interface {
	// Users names who uses m's device on its VM (mounts of it or of its
	// partitions, dm or md holders, processes other than volumed with it
	// open) and the connected clients of the volume's NBD export; none
	// when nothing does. m may be a mapping with only VolumeID set (no
	// mapping recorded): only the export is asked about then.
	Users(ctx context.Context, m commands.Mapping) ([]commands.DeviceUser, error)
}

// ExportEnder ends NBD exports (the host work).
type ExportEnder interface {
	// HasExport reports whether the volume has an export record.
	HasExport(ctx context.Context, volumeID string) (bool, error)
	// DropExport ends a volume's export, fenced by f, and returns its
	// name ("" when it had none).
	DropExport(ctx context.Context, f Fence, volumeID string) (string, error)
}

// Releaser is the one release sequence, for detach, delete and the
// reconcile: the volume's NBD export ends, the device agent lets go of
// its device (persistent name), then its mapping record goes.
type Releaser struct {
	// Mappings is the mapping writer.
	Mappings *MappingWriter
	// Exports ends the export; required.
	Exports ExportEnder
	// Devices is the device agent side; nil without agents.
	Devices Devices
	// InUse tells who uses a volume's device or export, for CheckFree;
	// nil: nothing is ever in use.
	InUse UseChecker
	// Wait bounds an operation's wait for the volume's device to go from
	// its VM (the step deadline); 0: one Detached call.
	Wait time.Duration
	// Log receives what could not be released.
	Log *slog.Logger
}

// CheckFree fails with CONFLICT, naming who, when the volume's device on
// its VM or its NBD export is in use (InUse), and with SERVICE_UNAVAILABLE
// when that cannot be told. A detach or delete asked with force skips it.
func (r *Releaser) CheckFree(ctx context.Context, volumeID string) error {
	if r.InUse == nil {
		return nil
	}
	m, err := r.Mappings.Get(ctx, volumeID)
	switch {
	case errors.Is(err, state.ErrNotFound):
		m = commands.Mapping{VolumeID: volumeID}
	case err != nil:
		return fmt.Errorf("%w: %w", ErrStopped, err)
	}
	users, err := r.InUse.Users(ctx, m)
	switch {
	case ctx.Err() != nil || errors.Is(err, ErrStopped):
		return fmt.Errorf("%w: %w", ErrStopped, err)
	case err != nil:
		return commands.Unavailable("cannot tell whether volume %s is in use on VM %s: %v (force skips this check)",
			volumeID, m.VMID, err).WithDetail("volume_id", volumeID)
	case len(users) > 0:
		where := ""
		if m.VMID != "" {
			where = " on VM " + m.VMID
		}
		return commands.Conflict("volume %s is in use%s: %s; stop using it, or use force", volumeID, where,
			commands.DeviceUsers(users)).WithDetail("volume_id", volumeID).WithDetail("users", users)
	}
	return nil
}

// Released is what a release ended.
type Released struct {
	// Export is the name of the export ended, "" for none.
	Export string
	// Mapping is the mapping released, nil when there was none.
	Mapping *commands.Mapping
	// Deleted: the mapping record was deleted (false when another
	// attachment's record stands now).
	Deleted bool
}

// Unexport ends the volume's export, if it has one, journaling
// StepUnexport first through mark (nil: nothing to journal).
func (r *Releaser) Unexport(ctx context.Context, f Fence, volumeID string, mark func(ctx context.Context, step string) error) (string, error) {
	has, err := r.Exports.HasExport(ctx, volumeID)
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrStopped, err)
	}
	if !has {
		return "", nil
	}
	if mark != nil {
		if err := mark(ctx, StepUnexport); err != nil {
			return "", err
		}
	}
	return r.Exports.DropExport(ctx, f, volumeID)
}

// Release ends the volume's export, device and mapping, fenced by f;
// m is the mapping as read (nil: read now). mark journals the steps on
// the operation running it (nil for the reconcile). An operation waits,
// up to Wait, for the kernel of a VM with an agent to remove the device,
// and fails with TIMEOUT, keeping the mapping, if it is still there; the
// reconcile releases the mapping all the same.
func (r *Releaser) Release(ctx context.Context, f Fence, volumeID string, m *commands.Mapping, mark func(ctx context.Context, step string) error) (Released, error) {
	var out Released
	name, err := r.Unexport(ctx, f, volumeID, mark)
	if err != nil {
		return out, err
	}
	out.Export = name
	if m == nil {
		cur, err := r.Mappings.Get(ctx, volumeID)
		if errors.Is(err, state.ErrNotFound) {
			return out, nil
		}
		if err != nil {
			return out, fmt.Errorf("%w: %w", ErrStopped, err)
		}
		m = &cur
	}
	out.Mapping = m
	if r.Devices != nil && r.Devices.HasAgent(ctx, m.VMID) {
		if mark != nil {
			if err := mark(ctx, StepRelease); err != nil {
				return out, err
			}
		}
		if f != nil {
			if err := f.Check(ctx); err != nil {
				return out, err
			}
		}
		if err := r.waitGone(ctx, *m, mark != nil); err != nil {
			return out, err
		}
	}
	out.Deleted, err = r.Mappings.DeleteReleased(ctx, f, *m)
	if err != nil && !errors.Is(err, ErrLost) && !errors.Is(err, ErrStopped) {
		err = fmt.Errorf("%w: %w", ErrStopped, err)
	}
	return out, err
}

// waitGone has the device agent release m's device, again while the
// device is still there, until Wait passes; then an operation (strict)
// fails with TIMEOUT and the reconcile goes on. Other failures of the
// release are logged.
func (r *Releaser) waitGone(ctx context.Context, m commands.Mapping, strict bool) error {
	deadline := time.Now().Add(r.Wait)
	pause := backoff.Policy{Min: 100 * time.Millisecond, Max: 2 * time.Second}.Start()
	for {
		err := r.Devices.Detached(ctx, m)
		switch {
		case ctx.Err() != nil:
			return fmt.Errorf("%w: device release: %w", ErrStopped, context.Cause(ctx))
		case err == nil:
			return nil
		case !errors.Is(err, ErrDevicePresent) || !strict:
			r.Log.Warn("device release incomplete", "volume_id", m.VolumeID, "err", err)
			return nil
		case time.Now().After(deadline):
			return commands.Timeout("volume %s is detached in CloudStack, but VM %s still shows its device %s after %v: %v",
				m.VolumeID, m.VMID, m.DevicePath, r.Wait, err).WithDetail("step", StepRelease).WithDetail("device_path", m.DevicePath)
		case !r.Devices.HasAgent(ctx, m.VMID):
			r.Log.Warn("the VM's device agent no longer answers; device release not confirmed", "volume_id", m.VolumeID, "vm_id", m.VMID, "err", err)
			return nil
		}
		r.Log.Info("device still on its VM; waiting for the kernel to remove it", "volume_id", m.VolumeID, "vm_id", m.VMID, "device", m.DevicePath)
		if !pause.Wait(ctx, 0) {
			return fmt.Errorf("%w: device release: %w", ErrStopped, context.Cause(ctx))
		}
	}
}
