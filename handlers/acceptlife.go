package handlers

import (
	"context"
	"errors"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/handlers/csapi"
	"github.com/volumed/volumed/kinds"
)

func (s *Service) acceptSnapshot(ctx context.Context, data []byte, key string) (any, error) {
	req, err := commands.DecodeSnapshot(data)
	if err != nil {
		return nil, err
	}
	return s.accept(ctx, key, commands.OpSnapshot, req.VolumeID, nil, req, func(ctx context.Context) error {
		return s.checkVolume(ctx, req.VolumeID)
	})
}

// acceptDeleteSnapshot looks the snapshot up to learn its volume, whose
// line the operation waits in: an unknown snapshot is 404, and a
// CloudStack that does not answer is 503 (the line cannot be known).
func (s *Service) acceptDeleteSnapshot(ctx context.Context, data []byte, key string) (any, error) {
	req, err := commands.DecodeSnapshotID(data)
	if err != nil {
		return nil, err
	}
	var volumeID string
	if key != "" {
		// The same command again: its operation names the volume.
		if seen, err := s.cfg.Store.GetOperation(ctx, OperationIDForKey(key)); err == nil {
			volumeID = seen.VolumeID
		}
	}
	if volumeID == "" {
		checkCtx, cancel := context.WithTimeout(ctx, s.cfg.CheckTimeout)
		snap, err := s.snapshot(checkCtx, req.SnapshotID)
		cancel()
		if err != nil {
			return nil, err
		}
		volumeID = snap.VolumeID
	}
	return s.accept(ctx, key, commands.OpDeleteSnapshot, volumeID, nil, req, func(context.Context) error { return nil })
}

func (s *Service) acceptRevert(ctx context.Context, data []byte, key string) (any, error) {
	req, err := commands.DecodeRevert(data)
	if err != nil {
		return nil, err
	}
	return s.accept(ctx, key, commands.OpRevert, req.VolumeID, nil, req, func(ctx context.Context) error {
		if err := s.checkVolume(ctx, req.VolumeID); err != nil {
			return err
		}
		snap, err := s.snapshot(ctx, req.SnapshotID)
		var ce *commands.Error
		switch {
		case errors.As(err, &ce) && ce.Code == commands.CodeServiceUnavailable:
			return nil // the kind looks again
		case err != nil:
			return err
		case snap.VolumeID != req.VolumeID:
			return kinds.SnapshotOfAnother(snap, req.VolumeID)
		}
		return nil
	})
}

// acceptResize refuses at once what CloudStack's resizeVolume refuses
// for the volume as it is: a shrink without shrink_ok (422
// CLOUDSTACK_ERROR with CloudStack's code and text).
func (s *Service) acceptResize(ctx context.Context, data []byte, key string) (any, error) {
	req, err := commands.DecodeResize(data)
	if err != nil {
		return nil, err
	}
	return s.accept(ctx, key, commands.OpResize, req.VolumeID, nil, req, func(ctx context.Context) error {
		vol, err := s.cfg.CloudStack.GetVolume(ctx, req.VolumeID)
		switch {
		case err == nil:
		case csapi.IsRetryable(err) || ctx.Err() != nil:
			return nil
		case errors.Is(err, csapi.ErrNotFound):
			return engine.VolumeNotFound(req.VolumeID)
		default:
			return engine.CloudStackError(err)
		}
		target := req.SizeGiB() * commands.MinVolumeSize
		if target < vol.Size && !req.ShrinkOK {
			return commands.CloudStack("CloudStack resizeVolume failed: the volume would shrink; set shrink_ok to allow it").
				WithDetail("cloudstack_error_code", csapi.CodeParamError).
				WithDetail("cloudstack_message", csapi.ShrinkText(vol.Size, target)).
				WithDetail("size", vol.Size)
		}
		return nil
	})
}

func (s *Service) acceptTags(ctx context.Context, data []byte, key string) (any, error) {
	req, err := commands.DecodeTags(data)
	if err != nil {
		return nil, err
	}
	return s.accept(ctx, key, commands.OpTags, req.VolumeID, nil, req, func(ctx context.Context) error {
		return s.checkVolume(ctx, req.VolumeID)
	})
}

// snapshot looks a snapshot up for a pre-check or a read: 404 when
// CloudStack does not know it, 503 when CloudStack does not answer.
func (s *Service) snapshot(ctx context.Context, snapshotID string) (csapi.Snapshot, error) {
	snap, err := s.cfg.CloudStack.GetSnapshot(ctx, snapshotID)
	switch {
	case err == nil:
		return snap, nil
	case errors.Is(err, csapi.ErrNotFound):
		return snap, kinds.SnapshotNotFound(snapshotID)
	case csapi.IsRetryable(err) || ctx.Err() != nil:
		return snap, commands.Unavailable("CloudStack did not answer for snapshot %s: %v", snapshotID, err)
	default:
		return snap, engine.CloudStackError(err)
	}
}
