package httpbridge

import (
	"context"
	"net/http"
	"strconv"
	"strings"

	"github.com/volumed/volumed/commands"
)

func (s *Server) getVolumeSnapshots(w http.ResponseWriter, r *http.Request) {
	byPathID(s, w, r, "volume_id", commands.NormalizeVolumeID, func(ctx context.Context, id string) ([]commands.Snapshot, error) {
		snaps, err := s.cfg.Backend.VolumeSnapshots(ctx, id)
		return nonNil(snaps), err
	})
}

func (s *Server) getSnapshot(w http.ResponseWriter, r *http.Request) {
	byPathID(s, w, r, "snapshot_id", commands.NormalizeSnapshotID, s.cfg.Backend.Snapshot)
}

func (s *Server) listVolumes(w http.ResponseWriter, r *http.Request) {
	f, err := parseVolumeFilter(r)
	if err != nil {
		writeError(w, err)
		return
	}
	ctx, cancel := s.readContext(r)
	defer cancel()
	rows, next, err := s.cfg.Backend.Volumes(ctx, f)
	if err != nil {
		writeError(w, err)
		return
	}
	setNextPage(w, r, next)
	writeJSON(w, http.StatusOK, nonNil(rows))
}

// parseVolumeFilter validates the query of GET /volumes: tag=k=v
// (repeatable), vm_id, name, limit and cursor (a volume id).
func parseVolumeFilter(r *http.Request) (commands.VolumeFilter, error) {
	q := r.URL.Query()
	f := commands.VolumeFilter{Limit: commands.DefaultListLimit, Name: q.Get("name")}
	for _, t := range q["tag"] {
		k, v, ok := strings.Cut(t, "=")
		if !ok || k == "" || v == "" {
			return f, commands.Invalid("tag", "tag must be key=value, got %q", commands.Shown(t, 80)).
				WithDetail("provided_value", commands.Shown(t, 80))
		}
		if f.Tags == nil {
			f.Tags = map[string]string{}
		}
		f.Tags[k] = v
	}
	var err error
	if v := q.Get("vm_id"); v != "" {
		if f.VMID, err = commands.NormalizeVMID(v); err != nil {
			return f, err
		}
	}
	if q.Has("limit") {
		v := q.Get("limit")
		n, convErr := strconv.Atoi(v)
		if convErr != nil || n <= 0 || n > commands.MaxListLimit {
			return f, commands.Invalid("limit", "limit must be an integer from 1 to %d, got %q", commands.MaxListLimit,
				commands.Shown(v, 40)).WithDetail("provided_value", commands.Shown(v, 40)).
				WithDetail("maximum_value", commands.MaxListLimit)
		}
		f.Limit = n
	}
	if v := q.Get("cursor"); v != "" {
		if f.Cursor, err = commands.NormalizeID("cursor", "", v); err != nil {
			return f, err
		}
	}
	return f, nil
}
