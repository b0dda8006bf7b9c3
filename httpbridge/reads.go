package httpbridge

import (
	"context"
	"errors"
	"net/http"
	"path"
	"regexp"
	"strings"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// readContext bounds one read made for a request.
func (s *Server) readContext(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.Context(), s.cfg.CommandTimeout)
}

// pathID decodes and validates an id path parameter with normalize.
func pathID(r *http.Request, name string, normalize func(string) (string, error)) (string, error) {
	raw, err := pathParam(r, name)
	if err != nil {
		return "", err
	}
	return normalize(raw)
}

func (s *Server) getVolume(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "volume_id", commands.NormalizeVolumeID)
	if err != nil {
		writeError(w, err)
		return
	}
	ctx, cancel := s.readContext(r)
	defer cancel()
	st, err := s.cfg.Backend.VolumeStatus(ctx, id)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) getVolumeDevice(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "volume_id", commands.NormalizeVolumeID)
	if err != nil {
		writeError(w, err)
		return
	}
	ctx, cancel := s.readContext(r)
	defer cancel()
	m, err := s.cfg.Store.GetMapping(ctx, id)
	if err != nil {
		writeError(w, notFoundAs(err, commands.NotFound("no device mapping for volume %s", id).WithDetail("volume_id", id)))
		return
	}
	writeJSON(w, http.StatusOK, m)
}

func (s *Server) getDeviceVolume(w http.ResponseWriter, r *http.Request) {
	raw, err := pathParam(r, "device_path")
	if err != nil {
		writeError(w, err)
		return
	}
	dev, err := NormalizeDevicePath(raw)
	if err != nil {
		writeError(w, err)
		return
	}
	vm := s.cfg.VMID
	if q := r.URL.Query().Get("vm_id"); q != "" {
		if vm, err = commands.NormalizeVMID(q); err != nil {
			writeError(w, err)
			return
		}
	}
	ctx, cancel := s.readContext(r)
	defer cancel()
	m, err := s.cfg.Store.GetMappingByDevice(ctx, vm, dev)
	if err != nil {
		writeError(w, notFoundAs(err, commands.NotFound("no volume is mapped to %s", dev).WithDetail("device_path", dev)))
		return
	}
	writeJSON(w, http.StatusOK, m)
}

func (s *Server) getVMVolumes(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "vm_id", commands.NormalizeVMID)
	if err != nil {
		writeError(w, err)
		return
	}
	ctx, cancel := s.readContext(r)
	defer cancel()
	vols, err := s.cfg.Backend.VMVolumes(ctx, id)
	if err != nil {
		writeError(w, err)
		return
	}
	if vols == nil {
		vols = []commands.VolumeStatus{}
	}
	writeJSON(w, http.StatusOK, vols)
}

func (s *Server) listExports(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := s.readContext(r)
	defer cancel()
	exports, err := s.cfg.Backend.Exports(ctx)
	if err != nil {
		writeError(w, err)
		return
	}
	if exports == nil {
		exports = []commands.Export{}
	}
	writeJSON(w, http.StatusOK, exports)
}

func (s *Server) getExport(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "volume_id", commands.NormalizeVolumeID)
	if err != nil {
		writeError(w, err)
		return
	}
	ctx, cancel := s.readContext(r)
	defer cancel()
	e, err := s.cfg.Backend.Export(ctx, id)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, e)
}

func (s *Server) getHealth(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := s.readContext(r)
	defer cancel()
	h := s.cfg.Backend.Health(ctx)
	status := http.StatusOK
	if h.Status == commands.Unhealthy {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, h)
}

func (s *Server) getMetrics(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := s.readContext(r)
	defer cancel()
	m, err := s.cfg.Backend.Metrics(ctx)
	if err != nil {
		writeError(w, err)
		return
	}
	if m.OperationsByType == nil {
		m.OperationsByType = map[string]int64{}
	}
	if m.OperationsByStatus == nil {
		m.OperationsByStatus = map[string]int64{}
	}
	writeJSON(w, http.StatusOK, m)
}

// notFoundAs answers a store's ErrNotFound with e, anything else as it is.
func notFoundAs(err error, e *commands.Error) error {
	if errors.Is(err, state.ErrNotFound) {
		return e
	}
	return err
}

// maxDevicePath bounds a device path.
const maxDevicePath = 255

var devicePathRE = regexp.MustCompile(`^/dev(/[A-Za-z0-9_.:+@-]+)+$`)

// NormalizeDevicePath validates a Linux device path given with or without
// its leading slash ("dev/vdb", "/dev/vdb", "/dev/disk/by-id/virtio-x")
// and returns it absolute. It must be clean and under /dev; nothing is
// read from the filesystem.
func NormalizeDevicePath(p string) (string, error) {
	if p == "" {
		return "", commands.Invalid("device_path", "device_path is required")
	}
	abs := p
	if !strings.HasPrefix(abs, "/") {
		abs = "/" + abs
	}
	if len(abs) > maxDevicePath || !devicePathRE.MatchString(abs) || path.Clean(abs) != abs ||
		strings.Contains(abs+"/", "/./") || strings.Contains(abs+"/", "/../") {
		shown := p
		if len(shown) > 80 {
			shown = shown[:80] + "…"
		}
		return "", commands.Invalid("device_path", "device_path must be a clean path under /dev, got %q", shown).
			WithDetail("provided_value", shown)
	}
	return abs, nil
}
