package kinds

import (
	"context"
	"errors"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
)

// The lifecycle kinds take their commands.
var (
	_ engine.Accepter = snapshot{}
	_ engine.Accepter = deleteSnapshot{}
	_ engine.Accepter = revert{}
	_ engine.Accepter = resize{}
	_ engine.Accepter = tags{}
)

// SnapshotLookupTimeout bounds delete_snapshot's look-up of its snapshot,
// which must answer before the operation is recorded (it names the line).
const SnapshotLookupTimeout = 1500 * time.Millisecond

// lookSnapshot finds a snapshot for a pre-check: 404 when CloudStack does
// not know it, 503 when CloudStack does not answer in time (unanswered
// reports that, so a caller may go on unchecked).
func (d Deps) lookSnapshot(ctx context.Context, snapshotID string) (snap csapi.Snapshot, unanswered bool, err error) {
	snap, err = d.CloudStack.GetSnapshot(ctx, snapshotID)
	switch {
	case err == nil:
		return snap, false, nil
	case errors.Is(err, csapi.ErrNotFound):
		return snap, false, SnapshotNotFound(snapshotID)
	case csapi.IsRetryable(err) || ctx.Err() != nil:
		return snap, true, commands.Unavailable("CloudStack did not answer for snapshot %s: %v", snapshotID, err)
	}
	return snap, false, engine.CloudStackError(err)
}

func (snapshot) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "snapshot", Subject: commands.SubjectSnapshot}}
}

// Decode reads a snapshot command; a volume CloudStack does not know is
// 404.
func (k snapshot) Decode(_ context.Context, _ string, data []byte) (engine.Command, error) {
	req, err := commands.DecodeSnapshot(data)
	if err != nil {
		return engine.Command{}, err
	}
	return engine.Command{VolumeID: req.VolumeID, Request: req, Check: func(_, ctx context.Context) error {
		return k.checkVolume(ctx, req.VolumeID)
	}}, nil
}

func (deleteSnapshot) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "delete_snapshot", Subject: commands.SubjectDeleteSnapshot}}
}

// Decode looks the snapshot up to learn its volume, whose line the
// operation waits in: an unknown snapshot is 404, and a CloudStack that
// does not answer within SnapshotLookupTimeout is 503 (the line cannot be
// known), nothing recorded.
func (k deleteSnapshot) Decode(ctx context.Context, _ string, data []byte) (engine.Command, error) {
	req, err := commands.DecodeSnapshotID(data)
	if err != nil {
		return engine.Command{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, SnapshotLookupTimeout)
	defer cancel()
	snap, _, err := k.lookSnapshot(ctx, req.SnapshotID)
	if err != nil {
		return engine.Command{}, err
	}
	return engine.Command{VolumeID: snap.VolumeID, Request: req}, nil
}

func (revert) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "revert", Subject: commands.SubjectRevert}}
}

// Decode reads a revert: the volume and the snapshot must be known to
// CloudStack (404), and the snapshot be the volume's (400 on
// snapshot_id). Whether CloudStack allows it now (the volume detached or
// its VM Stopped) its job says.
func (k revert) Decode(_ context.Context, _ string, data []byte) (engine.Command, error) {
	req, err := commands.DecodeRevert(data)
	if err != nil {
		return engine.Command{}, err
	}
	return engine.Command{VolumeID: req.VolumeID, Request: req, Check: func(_, ctx context.Context) error {
		if err := k.checkVolume(ctx, req.VolumeID); err != nil {
			return err
		}
		snap, unanswered, err := k.lookSnapshot(ctx, req.SnapshotID)
		switch {
		case unanswered:
			return nil // the kind looks again
		case err != nil:
			return err
		case snap.VolumeID != req.VolumeID:
			return SnapshotOfAnother(snap, req.VolumeID)
		}
		return nil
	}}, nil
}

func (resize) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "resize", Subject: commands.SubjectResize}}
}

// Decode reads a resize and refuses at once what CloudStack's
// resizeVolume refuses for the volume as it is: a shrink without
// shrink_ok, 422 CLOUDSTACK_ERROR with CloudStack's code and text. A
// volume CloudStack does not know is 404.
func (k resize) Decode(_ context.Context, _ string, data []byte) (engine.Command, error) {
	req, err := commands.DecodeResize(data)
	if err != nil {
		return engine.Command{}, err
	}
	return engine.Command{VolumeID: req.VolumeID, Request: req, Check: func(_, ctx context.Context) error {
		vol, err := k.CloudStack.GetVolume(ctx, req.VolumeID)
		switch {
		case err == nil:
		case csapi.IsRetryable(err) || ctx.Err() != nil:
			return nil
		case errors.Is(err, csapi.ErrNotFound):
			return engine.VolumeNotFound(req.VolumeID)
		default:
			return engine.CloudStackError(err)
		}
		if target := req.SizeGiB() * commands.MinVolumeSize; target < vol.Size && !req.ShrinkOK {
			return commands.CloudStack("CloudStack resizeVolume failed: the volume would shrink; set shrink_ok to allow it").
				WithDetail("cloudstack_error_code", csapi.CodeParamError).
				WithDetail("cloudstack_message", csapi.ShrinkText(vol.Size, target)).
				WithDetail("size", vol.Size)
		}
		return nil
	}}, nil
}

func (tags) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "tags", Subject: commands.SubjectTags}}
}

// Decode reads a tags command; a volume CloudStack does not know is 404.
func (k tags) Decode(_ context.Context, _ string, data []byte) (engine.Command, error) {
	req, err := commands.DecodeTags(data)
	if err != nil {
		return engine.Command{}, err
	}
	return engine.Command{VolumeID: req.VolumeID, Request: req, Check: func(_, ctx context.Context) error {
		return k.checkVolume(ctx, req.VolumeID)
	}}, nil
}
