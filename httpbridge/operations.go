package httpbridge

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// eventBuffer is how many operation events a waiting request buffers.
const eventBuffer = 16

func (s *Server) getOperation(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "operation_id", commands.NormalizeOperationID)
	if err != nil {
		writeError(w, err)
		return
	}
	wait, err := s.parseWait(r)
	if err != nil {
		writeError(w, err)
		return
	}
	body, err := s.waitOperation(r.Context(), id, wait)
	if err != nil {
		if r.Context().Err() != nil {
			return // the client went away
		}
		writeError(w, notFoundAs(err, commands.NotFound("operation %s not found", id).WithDetail("operation_id", id)))
		return
	}
	writeRaw(w, http.StatusOK, body)
}

// parseWait reads ?wait, a Go duration capped at MaxWait; 0 when absent.
func (s *Server) parseWait(r *http.Request) (time.Duration, error) {
	q := r.URL.Query()
	if !q.Has("wait") {
		return 0, nil
	}
	v := q.Get("wait")
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return 0, commands.Invalid("wait", "wait must be a non-negative Go duration such as 30s, got %q", v).
			WithDetail("provided_value", v)
	}
	return min(d, s.cfg.MaxWait), nil
}

// waitOperation returns the stored operation's JSON. With a wait, a
// non-terminal operation is waited for until it ends, the wait passes, or
// the server closes: through the store when it tells of ends in process
// (state.OperationEnds), else on the operation's events. The store's
// latest record is answered in every case.
func (s *Server) waitOperation(ctx context.Context, id string, wait time.Duration) ([]byte, error) {
	if wait <= 0 {
		return s.readJSON(ctx, id)
	}
	if ends, ok := s.cfg.Store.(state.OperationEnds); ok {
		return s.waitInStore(ctx, ends, id, wait)
	}
	return s.waitOnEvents(ctx, id, wait)
}

// waitInStore waits for the operation's end as the store sees it, watched
// before the record is read so no end is missed. An end this process
// wrote is answered as written (the latest record when it was written); an
// end another process wrote, or a delete, is read from the store.
func (s *Server) waitInStore(ctx context.Context, ends state.OperationEnds, id string, wait time.Duration) ([]byte, error) {
	w := ends.WatchEnd(id)
	defer w.Stop()
	op, err := s.readOperation(ctx, id)
	if err != nil || op.Status.Terminal() {
		return encodeOp(op, err)
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-w.Done():
		if rec := w.Record(); rec != nil {
			return rec, nil
		}
	case <-timer.C:
	case <-s.closing:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return s.readJSON(ctx, id)
}

// waitOnEvents watches the operation's event subject, subscribed before
// the store is read so no event is missed, until an event reports a
// terminal status, and then reads the store.
func (s *Server) waitOnEvents(ctx context.Context, id string, wait time.Duration) ([]byte, error) {
	events := make(chan *nats.Msg, eventBuffer)
	sub, err := s.cfg.Conn.ChanSubscribe(commands.OpSubject(id), events)
	if err != nil {
		return nil, commands.Unavailable("subscribe to operation events: %v", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	flushCtx, cancel := context.WithTimeout(ctx, s.cfg.QueryTimeout)
	err = s.cfg.Conn.FlushWithContext(flushCtx)
	cancel()
	if err != nil {
		return nil, commands.Unavailable("subscribe to operation events: %v", err)
	}
	op, err := s.readOperation(ctx, id)
	if err != nil || op.Status.Terminal() {
		return encodeOp(op, err)
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		select {
		case msg := <-events:
			if bus.FromConsumer(msg) {
				continue // a consumer's copy, not the event
			}
			var ev struct {
				Status commands.OpStatus `json:"status"`
			}
			if json.Unmarshal(msg.Data, &ev) != nil || !ev.Status.Terminal() {
				continue
			}
		case <-timer.C:
		case <-s.closing:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return s.readJSON(ctx, id)
	}
}

// readJSON reads one operation from the store and encodes it.
func (s *Server) readJSON(ctx context.Context, id string) ([]byte, error) {
	return encodeOp(s.readOperation(ctx, id))
}

// encodeOp is the JSON of op, or err.
func encodeOp(op commands.Operation, err error) ([]byte, error) {
	if err != nil {
		return nil, err
	}
	return json.Marshal(op)
}

// readOperation reads one operation from the store under the read timeout.
func (s *Server) readOperation(ctx context.Context, id string) (commands.Operation, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.QueryTimeout)
	defer cancel()
	return s.cfg.Store.GetOperation(ctx, id)
}

func (s *Server) listOperations(w http.ResponseWriter, r *http.Request) {
	f, err := parseFilter(r)
	if err != nil {
		writeError(w, err)
		return
	}
	ctx, cancel := s.readContext(r)
	defer cancel()
	ops, next, err := s.cfg.Store.ListOperations(ctx, f)
	if err != nil {
		writeError(w, err)
		return
	}
	rows := make([]commands.OperationSummary, 0, len(ops))
	for i := range ops {
		rows = append(rows, ops[i].Summary())
	}
	setNextPage(w, r, next)
	writeJSON(w, http.StatusOK, rows)
}

// maxRequestedBy bounds the requested_by filter.
const maxRequestedBy = 256

// parseFilter validates the query of GET /operations.
func parseFilter(r *http.Request) (state.Filter, error) {
	q := r.URL.Query()
	var f state.Filter
	var err error
	if v := q.Get("type"); v != "" {
		if f.Type, err = oneOf("type", v, commands.OpTypes); err != nil {
			return f, err
		}
	}
	if v := q.Get("status"); v != "" {
		if f.Status, err = oneOf("status", v, commands.OpStatuses); err != nil {
			return f, err
		}
	}
	if v := q.Get("volume_id"); v != "" {
		if f.VolumeID, err = commands.NormalizeVolumeID(v); err != nil {
			return f, err
		}
	}
	if v := q.Get("vm_id"); v != "" {
		if f.VMID, err = commands.NormalizeVMID(v); err != nil {
			return f, err
		}
	}
	if v := q.Get("requested_by"); v != "" {
		if len(v) > maxRequestedBy {
			return f, commands.Invalid("requested_by", "requested_by must have at most %d characters", maxRequestedBy).
				WithDetail("provided_value", commands.Shown(v, 40))
		}
		f.RequestedBy = v
	}
	f.Limit = commands.DefaultListLimit
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
	f.Cursor = q.Get("cursor")
	return f, nil
}

// oneOf returns v as T if it is one of allowed.
func oneOf[T ~string](field, v string, allowed []T) (T, error) {
	for _, a := range allowed {
		if string(a) == v {
			return a, nil
		}
	}
	return "", commands.Invalid(field, "unknown %s %q", field, commands.Shown(v, 40)).WithDetail("provided_value", commands.Shown(v, 40)).
		WithDetail("allowed_values", allowed)
}
