package handlers

import (
	"context"
	"errors"
	"slices"
	"strings"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/kinds"
)

// Volumes lists the volumes f selects, ordered by id, a page at a time,
// each as GET /volumes/{id} shows it: next is the cursor of the next page,
// "" after the last.
func (s *Service) Volumes(ctx context.Context, f commands.VolumeFilter) (rows []commands.VolumeStatus, next string, err error) {
	vols, err := s.cfg.CloudStack.ListVolumes(ctx, csapi.ListFilter{VMID: f.VMID, Name: f.Name, Tags: f.Tags})
	if err != nil {
		return nil, "", engine.CloudStackError(err)
	}
	slices.SortFunc(vols, func(a, b csapi.Volume) int { return strings.Compare(a.ID, b.ID) })
	start, _ := slices.BinarySearchFunc(vols, f.Cursor, func(v csapi.Volume, id string) int { return strings.Compare(v.ID, id) })
	if start < len(vols) && vols[start].ID == f.Cursor {
		start++
	}
	vols = vols[start:]
	if len(vols) > f.Limit {
		vols = vols[:f.Limit]
		next = vols[len(vols)-1].ID
	}
	rows = make([]commands.VolumeStatus, 0, len(vols))
	for _, v := range vols {
		row, err := s.volumeStatus(ctx, v)
		if err != nil {
			return nil, "", err
		}
		rows = append(rows, row)
	}
	return rows, next, nil
}

// VolumeSnapshots lists a volume's snapshots, newest first; NOT_FOUND
// when CloudStack does not know the volume.
func (s *Service) VolumeSnapshots(ctx context.Context, volumeID string) ([]commands.Snapshot, error) {
	snaps, err := s.cfg.CloudStack.ListSnapshots(ctx, csapi.SnapshotFilter{VolumeID: volumeID})
	if errors.Is(err, csapi.ErrNotFound) {
		if _, gerr := s.cfg.CloudStack.GetVolume(ctx, volumeID); errors.Is(gerr, csapi.ErrNotFound) {
			return nil, engine.VolumeNotFound(volumeID)
		}
	}
	if err != nil {
		return nil, engine.CloudStackError(err)
	}
	out := make([]commands.Snapshot, 0, len(snaps))
	for _, sn := range snaps {
		out = append(out, SnapshotView(sn))
	}
	return out, nil
}

// Snapshot is one snapshot; NOT_FOUND when CloudStack does not know it
// (or it was deleted).
func (s *Service) Snapshot(ctx context.Context, snapshotID string) (commands.Snapshot, error) {
	snap, err := s.cfg.CloudStack.GetSnapshot(ctx, snapshotID)
	switch {
	case errors.Is(err, csapi.ErrNotFound):
		return commands.Snapshot{}, kinds.SnapshotNotFound(snapshotID)
	case err != nil:
		return commands.Snapshot{}, engine.CloudStackError(err)
	}
	return SnapshotView(snap), nil
}

// SnapshotView is a CloudStack snapshot as the API shows it.
func SnapshotView(s csapi.Snapshot) commands.Snapshot {
	v := commands.Snapshot{ID: s.ID, VolumeID: s.VolumeID, Name: s.Name, State: s.State, Size: s.Size}
	if at, err := time.Parse(csapi.TimeLayout, s.Created); err == nil {
		at = at.UTC()
		v.CreatedAt = &at
	}
	return v
}
