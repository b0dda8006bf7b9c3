package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// MappingWriter is the one writer of device mappings and of their events
// on volumes.mappings.<volume_id>: the steps, the resolution of timed-out
// jobs, both reconciles, the device correlation and the upgrade's identity
// backfill write through it.
//
// A write is fenced: the writer checks its Fence before the write, writes
// by compare-and-swap, and checks the fence again after; a writer that
// lost its claim in between undoes its own write when the record is still
// at the revision it wrote (nothing newer replaced it). See docs/engine.md.
type MappingWriter struct {
	store    state.Mappings
	announce func(commands.Mapping)
	log      *slog.Logger
}

// NewMappingWriter returns the writer of store's mappings; announce, when
// set, publishes a mapping on volumes.mappings.<volume_id> (Announce).
func NewMappingWriter(store state.Mappings, announce func(commands.Mapping), log *slog.Logger) *MappingWriter {
	if log == nil {
		log = slog.Default()
	}
	return &MappingWriter{store: store, announce: announce, log: log}
}

// Get reads a volume's mapping.
func (w *MappingWriter) Get(ctx context.Context, volumeID string) (commands.Mapping, error) {
	return w.store.GetMapping(ctx, volumeID)
}

// Put writes m by compare-and-swap on m.Revision (0 creates), fenced by
// f (nil: unfenced). It returns the mapping as written; an error wrapping
// ErrLost when f says the claim is gone (then the store holds no write of
// this call), and the store's errors (ErrStale, ErrConflict) as they are.
func (w *MappingWriter) Put(ctx context.Context, f Fence, m commands.Mapping) (commands.Mapping, error) {
	var prev *commands.Mapping
	if f != nil {
		if err := f.Check(ctx); err != nil {
			return m, err
		}
		if m.Revision != 0 {
			cur, err := w.store.GetMapping(ctx, m.VolumeID)
			if err != nil {
				return m, fmt.Errorf("%w: %w", ErrStopped, err)
			}
			prev = &cur
		}
	}
	saved, err := w.store.PutMapping(ctx, m)
	if err != nil || f == nil {
		return saved, err
	}
	if ferr := f.Check(ctx); ferr != nil {
		w.undoPut(ctx, saved, prev, ferr)
		return saved, ferr
	}
	return saved, nil
}

// undoPut puts back what a write that lost its fence replaced: prev, or
// nothing when it created the record; only while the record is still at
// the revision the write left.
func (w *MappingWriter) undoPut(ctx context.Context, saved commands.Mapping, prev *commands.Mapping, why error) {
	var err error
	if prev == nil {
		err = w.store.DeleteMapping(ctx, saved.VolumeID, saved.Revision)
	} else {
		back := *prev
		back.Revision = saved.Revision
		_, err = w.store.PutMapping(ctx, back)
	}
	switch {
	case errors.Is(err, state.ErrStale):
		w.log.Warn("late mapping write: a newer one replaced it already", "volume_id", saved.VolumeID, "why", why)
	case err != nil:
		w.log.Error("late mapping write could not be undone; the reconcile repairs it", "volume_id", saved.VolumeID, "err", err, "why", why)
	default:
		w.log.Warn("late mapping write undone", "volume_id", saved.VolumeID, "why", why)
	}
}

// DeleteReleased deletes the mapping m of a released attachment, fenced
// by f (checked before each try; the delete is compare-and-swap on the
// revision read, so it never deletes a mapping written after m, and a
// delete that lands is the one its attachment's release asked for). The device side may have changed the record since m was read (its
// device went away, so it is now missing): on a stale revision it reads
// the record again and deletes it if it is still this attachment (same
// mapping on the same VM, not detected on another device). It reports
// whether a record was deleted.
func (w *MappingWriter) DeleteReleased(ctx context.Context, f Fence, m commands.Mapping) (bool, error) {
	for {
		if f != nil {
			if err := f.Check(ctx); err != nil {
				return false, err
			}
		}
		err := w.store.DeleteMapping(ctx, m.VolumeID, m.Revision)
		if !errors.Is(err, state.ErrStale) {
			return err == nil, err
		}
		cur, err := w.store.GetMapping(ctx, m.VolumeID)
		if errors.Is(err, state.ErrNotFound) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if cur.ID != m.ID || cur.VMID != m.VMID || (cur.LinuxState == commands.LinuxDetected && cur.DevicePath != m.DevicePath) {
			return false, nil // another attachment now: not ours to delete
		}
		m = cur
	}
}

// Announce publishes m on volumes.mappings.<volume_id>, for the hosts
// whose exports follow it.
func (w *MappingWriter) Announce(m commands.Mapping) {
	if w.announce != nil {
		w.announce(m)
	}
}
