package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/volumed/volumed/commands"
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
	// once its device is gone or after a timeout.
	Detached(ctx context.Context, m commands.Mapping) error
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
	// Log receives what could not be released.
	Log *slog.Logger
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
// the operation running it (nil for the reconcile).
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
		if err := r.Devices.Detached(ctx, *m); err != nil {
			if ctx.Err() != nil {
				return out, fmt.Errorf("%w: device release: %w", ErrStopped, context.Cause(ctx))
			}
			r.Log.Warn("device release incomplete", "volume_id", volumeID, "err", err)
		}
	}
	out.Deleted, err = r.Mappings.DeleteReleased(ctx, f, *m)
	if err != nil && !errors.Is(err, ErrLost) && !errors.Is(err, ErrStopped) {
		err = fmt.Errorf("%w: %w", ErrStopped, err)
	}
	return out, err
}
