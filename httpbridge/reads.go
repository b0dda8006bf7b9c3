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
	return context.WithTimeout(r.Context(), s.cfg.QueryTimeout)
}

// pathID decodes and validates an id path parameter with normalize.
func pathID(r *http.Request, name string, normalize func(string) (string, error)) (string, error) {
	raw, err := pathParam(r, name)
	if err != nil {
		return "", err
	}
	return normalize(raw)
}

// serveRead runs one read under the read timeout and answers its result
// as 200 JSON, or its error in the documented format.
func serveRead[T any](s *Server, w http.ResponseWriter, r *http.Request, read func(ctx context.Context) (T, error)) {
	ctx, cancel := s.readContext(r)
	defer cancel()
	v, err := read(ctx)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// byPathID answers a read keyed by an id path parameter.
func byPathID[T any](s *Server, w http.ResponseWriter, r *http.Request, name string,
	normalize func(string) (string, error), read func(ctx context.Context, id string) (T, error)) {
	id, err := pathID(r, name, normalize)
	if err != nil {
		writeError(w, err)
		return
	}
	serveRead(s, w, r, func(ctx context.Context) (T, error) { return read(ctx, id) })
}

// nonNil returns list, or [] for nil, so that JSON shows [] not null.
func nonNil[T any](list []T) []T {
	if list == nil {
		return []T{}
	}
	return list
}

func (s *Server) getVolume(w http.ResponseWriter, r *http.Request) {
	byPathID(s, w, r, "volume_id", commands.NormalizeVolumeID, s.cfg.Backend.VolumeStatus)
}

func (s *Server) getVolumeDevice(w http.ResponseWriter, r *http.Request) {
	byPathID(s, w, r, "volume_id", commands.NormalizeVolumeID, func(ctx context.Context, id string) (commands.Mapping, error) {
		m, err := state.GatedMapping(ctx, s.cfg.Store, s.cfg.Backend.AwaitStartCheck, id)
		return m, notFoundAs(err, commands.NotFound("no device mapping for volume %s", id).WithDetail("volume_id", id))
	})
}

func (s *Server) getDeviceVolume(w http.ResponseWriter, r *http.Request) {
	vm := s.cfg.VMID
	if q := r.URL.Query().Get("vm_id"); q != "" {
		var err error
		if vm, err = commands.NormalizeVMID(q); err != nil {
			writeError(w, err)
			return
		}
	}
	byPathID(s, w, r, "device_path", NormalizeDevicePath, func(ctx context.Context, dev string) (commands.Mapping, error) {
		if _, err := s.cfg.Backend.AwaitStartCheck(ctx, vm); err != nil {
			return commands.Mapping{}, err
		}
		m, err := s.cfg.Store.GetMappingByDevice(ctx, vm, dev)
		return m, notFoundAs(err, commands.NotFound("no volume is mapped to %s", dev).WithDetail("device_path", dev))
	})
}

func (s *Server) getVMVolumes(w http.ResponseWriter, r *http.Request) {
	byPathID(s, w, r, "vm_id", commands.NormalizeVMID, func(ctx context.Context, id string) ([]commands.VolumeStatus, error) {
		vols, err := s.cfg.Backend.VMVolumes(ctx, id)
		return nonNil(vols), err
	})
}

func (s *Server) listExports(w http.ResponseWriter, r *http.Request) {
	serveRead(s, w, r, func(ctx context.Context) ([]commands.Export, error) {
		exports, err := s.cfg.Backend.Exports(ctx)
		return nonNil(exports), err
	})
}

func (s *Server) getExport(w http.ResponseWriter, r *http.Request) {
	byPathID(s, w, r, "volume_id", commands.NormalizeVolumeID, s.cfg.Backend.Export)
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
	serveRead(s, w, r, func(ctx context.Context) (commands.Metrics, error) {
		m, err := s.cfg.Backend.Metrics(ctx)
		if m.OperationsByType == nil {
			m.OperationsByType = map[string]int64{}
		}
		if m.OperationsByStatus == nil {
			m.OperationsByStatus = map[string]int64{}
		}
		return m, err
	})
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
		shown := commands.Shown(p, 80)
		return "", commands.Invalid("device_path", "device_path must be a clean path under /dev, got %q", shown).
			WithDetail("provided_value", shown)
	}
	return abs, nil
}
