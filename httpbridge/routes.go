package httpbridge

import (
	"encoding/json"
	"net/http"
	"net/url"
	"runtime/debug"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// routes builds the router: every route under BasePath, JSON errors for
// unknown routes and wrong methods.
func (s *Server) routes() http.Handler {
	r := chi.NewRouter()
	r.Use(s.logRequests, s.recoverPanics, jsonContentType, s.guard)
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, commands.NotFound("no route for %s %s", r.Method, r.URL.Path))
	})
	r.MethodNotAllowed(func(w http.ResponseWriter, req *http.Request) {
		allowed := allowedMethods(r, req)
		w.Header().Set("Allow", strings.Join(allowed, ", "))
		e := commands.Invalid("", "method %s is not allowed on %s", req.Method, req.URL.Path).
			WithDetail("allowed_methods", allowed)
		e.Status = http.StatusMethodNotAllowed
		writeError(w, e)
	})
	if s.cfg.Prometheus != nil {
		r.Method(http.MethodGet, PrometheusPath, s.cfg.Prometheus)
	}
	r.Route(BasePath, func(r chi.Router) {
		r.Post("/volumes", s.command(commands.SubjectCreate, false))
		r.Get("/volumes", s.listVolumes)
		r.Get("/volumes/{volume_id}", s.getVolume)
		r.Delete("/volumes/{volume_id}", s.command(commands.SubjectDelete, true))
		r.Post("/volumes/{volume_id}/attach", s.command(commands.SubjectAttach, true))
		r.Post("/volumes/{volume_id}/attach-root", s.command(commands.SubjectAttachRoot, true))
		r.Post("/volumes/{volume_id}/detach", s.command(commands.SubjectDetach, true))
		r.Get("/volumes/{volume_id}/device", s.getVolumeDevice)
		r.Get("/volumes/{volume_id}/snapshots", s.getVolumeSnapshots)
		r.Post("/volumes/{volume_id}/snapshots", s.command(commands.SubjectSnapshot, true))
		r.Post("/volumes/{volume_id}/revert", s.command(commands.SubjectRevert, true))
		r.Post("/volumes/{volume_id}/resize", s.command(commands.SubjectResize, true))
		r.Put("/volumes/{volume_id}/tags", s.command(commands.SubjectTags, true))
		r.Get("/snapshots/{snapshot_id}", s.getSnapshot)
		r.Delete("/snapshots/{snapshot_id}", s.commandOn(commands.SubjectDeleteSnapshot,
			pathMerge{param: "snapshot_id", field: "snapshot_id", normalize: commands.NormalizeSnapshotID}))
		r.Get("/devices/{device_path}/volume", s.getDeviceVolume)
		r.Get("/vms/{vm_id}/volumes", s.getVMVolumes)
		r.Get("/exports", s.listExports)
		r.Post("/exports", s.command(commands.SubjectExport, false))
		r.Get("/exports/{volume_id}", s.getExport)
		r.Delete("/exports/{volume_id}", s.command(commands.SubjectUnexport, true))
		r.Post("/failovers", s.command(commands.SubjectFailover, false))
		r.Post("/failovers/{operation_id}/rollback", s.commandOn(commands.SubjectRollback,
			pathMerge{param: "operation_id", field: "failover_id", normalize: commands.NormalizeOperationID}))
		r.Get("/operations", s.listOperations)
		r.Get("/operations/{operation_id}", s.getOperation)
		r.Post("/admin/force-sync", s.command(commands.SubjectForceSync, false))
		r.Get("/health", s.getHealth)
		r.Get("/metrics", s.getMetrics)
		r.Get("/openapi.json", serveOpenAPI)
	})
	return r
}

// PrometheusPath serves the Prometheus text exposition (Config.Prometheus).
const PrometheusPath = "/metrics"

// routeMethods are the methods the API serves anywhere.
var routeMethods = []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodDelete}

// allowedMethods lists the methods the router serves on req's path.
func allowedMethods(mux chi.Routes, req *http.Request) []string {
	path := req.URL.RawPath
	if path == "" {
		path = req.URL.Path
	}
	var allowed []string
	for _, m := range routeMethods {
		if mux.Match(chi.NewRouteContext(), m, path) {
			allowed = append(allowed, m)
		}
	}
	return allowed
}

// pathParam returns a decoded URL parameter. chi matches on the escaped
// path when the URL has one (an encoded slash), so its values are then
// still escaped.
func pathParam(r *http.Request, name string) (string, error) {
	v := chi.URLParam(r, name)
	if r.URL.RawPath == "" {
		return v, nil
	}
	d, err := url.PathUnescape(v)
	if err != nil {
		return "", commands.Invalid(name, "%s is not a valid URL path segment", name)
	}
	return d, nil
}

// jsonContentType marks every response as JSON.
func jsonContentType(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		next.ServeHTTP(w, r)
	})
}

// logRequests logs one line per request.
func (s *Server) logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		ww := middleware.NewWrapResponseWriter(w, r.ProtoMajor)
		next.ServeHTTP(ww, r)
		status := ww.Status()
		if status == 0 {
			status = http.StatusOK
		}
		s.log.Info("request", "method", r.Method, "path", r.URL.EscapedPath(), "status", status,
			"duration", time.Since(start), "bytes", ww.BytesWritten())
	})
}

// recoverPanics answers a panicking handler with 500 INTERNAL_ERROR.
func (s *Server) recoverPanics(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			rec := recover()
			if rec == nil {
				return
			}
			if rec == http.ErrAbortHandler {
				panic(rec)
			}
			s.log.Error("handler panicked", "method", r.Method, "path", r.URL.EscapedPath(),
				"panic", rec, "stack", string(debug.Stack()))
			if ww, ok := w.(middleware.WrapResponseWriter); ok && ww.Status() != 0 {
				return // the response has begun: nothing more can be said
			}
			writeError(w, commands.Internal("internal error"))
		}()
		next.ServeHTTP(w, r)
	})
}

// writeError answers err in the documented error format.
func writeError(w http.ResponseWriter, err error) {
	e := state.APIError(err)
	status := e.Status
	if status == 0 {
		status = http.StatusInternalServerError
	}
	writeJSON(w, status, e)
}

// writeJSON answers v as JSON with status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		body, _ = json.Marshal(commands.Internal("encode response: %v", err))
	}
	writeRaw(w, status, body)
}

// writeRaw answers a JSON body as it is.
func writeRaw(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
