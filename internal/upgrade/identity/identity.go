// Package identity records the disk identity of this host's mappings and
// exports written by a release that did not record one (before
// commands.DeviceIdentity): exports are served only from a recorded
// identity, so without it an upgrade would end them.
package identity

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/formation"
	"github.com/volumed/volumed/state"
)

// Store is what Backfill reads and writes.
type Store interface {
	state.Mappings
	state.Exports
}

// Backfill gives each mapping of vmID without an identity, whose device was
// found, the identity of the disk now at its device path (of its size,
// when the mapping has one): the disk a mapping without identity is taken
// to be anyway. Then each export of vmID without an identity gets its
// mapping's. Every write is compare-and-swap: a record changed meanwhile
// is left as it is. Records whose disk is not here are left to the
// reconcile, which ends their exports. Each request, made at start, waits
// for a cluster still forming or catching up (formation.Wait); a write
// asked again after a lost answer finds its record changed and leaves it.
func Backfill(ctx context.Context, store Store, vmID string, devices []commands.Device, log *slog.Logger) error {
	byPath := make(map[string]commands.Device, len(devices))
	for _, d := range devices {
		byPath[d.Path] = d
	}
	wait := func(what string, req func(ctx context.Context) error) error {
		return formation.Wait(ctx, log, what, req)
	}
	var ms []commands.Mapping
	err := wait("mappings", func(ctx context.Context) error {
		var err error
		ms, err = store.ListMappings(ctx, vmID)
		return err
	})
	if err != nil {
		return fmt.Errorf("identity: list mappings: %w", err)
	}
	mappings, exports := 0, 0
	w := engine.NewMappingWriter(store, nil, log) // unfenced: before any operation runs
	for _, m := range ms {
		if m.DeviceIdentity != nil || m.LinuxState != commands.LinuxDetected || m.DevicePath == "" {
			continue
		}
		d, ok := byPath[m.DevicePath]
		if !ok || (m.Size != 0 && d.Size != m.Size) {
			log.Warn("mapping without disk identity and without its disk here: left to the reconcile",
				"volume_id", m.VolumeID, "device", m.DevicePath)
			continue
		}
		id := d.Identity()
		m.DeviceIdentity = &id
		err := wait("mapping of "+m.VolumeID, func(ctx context.Context) error {
			_, err := w.Put(ctx, nil, m)
			return err
		})
		if errors.Is(err, state.ErrStale) || errors.Is(err, state.ErrConflict) {
			continue
		} else if err != nil {
			return fmt.Errorf("identity: mapping of %s: %w", m.VolumeID, err)
		}
		mappings++
	}
	var es []commands.Export
	err = wait("exports", func(ctx context.Context) error {
		var err error
		es, err = store.ListExports(ctx)
		return err
	})
	if err != nil {
		return fmt.Errorf("identity: list exports: %w", err)
	}
	for _, e := range es {
		if e.VMID != vmID || e.DeviceIdentity != nil {
			continue
		}
		var m commands.Mapping
		err := wait("mapping of "+e.VolumeID, func(ctx context.Context) error {
			var err error
			m, err = store.GetMapping(ctx, e.VolumeID)
			return err
		})
		if errors.Is(err, state.ErrNotFound) {
			continue
		} else if err != nil {
			return fmt.Errorf("identity: mapping of %s: %w", e.VolumeID, err)
		}
		if m.DeviceIdentity == nil || m.VMID != vmID {
			continue
		}
		e.DeviceIdentity = m.DeviceIdentity
		err = wait("export of "+e.VolumeID, func(ctx context.Context) error {
			_, err := store.PutExport(ctx, e)
			return err
		})
		if errors.Is(err, state.ErrStale) {
			continue
		} else if err != nil {
			return fmt.Errorf("identity: export of %s: %w", e.VolumeID, err)
		}
		exports++
	}
	if mappings+exports > 0 {
		log.Info("recorded the disk identity of records written without one", "component", "upgrade",
			"mappings", mappings, "exports", exports)
	}
	return nil
}
