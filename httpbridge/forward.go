package httpbridge

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
)

// forward returns a handler that sends the request body to subject over
// NATS request/reply and answers the reply as it is, with the HTTP status
// of its StatusHeader. The Idempotency-Key header goes along, and a
// reply's Retry-After comes back. withVolume handlers take volume_id from
// the path and merge it into the body. timeout bounds the round trip.
func (s *Server) forward(subject string, withVolume bool, timeout time.Duration) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := readBody(w, r)
		if err != nil {
			writeError(w, err)
			return
		}
		if withVolume {
			if body, err = withPathVolume(r, body); err != nil {
				writeError(w, err)
				return
			}
		}
		ctx, cancel := context.WithTimeout(r.Context(), timeout)
		defer cancel()
		msg := nats.NewMsg(subject)
		msg.Data = body
		if key := r.Header.Get(commands.IdempotencyKeyHeader); key != "" {
			msg.Header.Set(commands.IdempotencyKeyHeader, key)
		}
		status, reply, err := s.request(ctx, msg)
		if err != nil {
			if ctx.Err() != nil && r.Context().Err() != nil {
				return // the client went away
			}
			s.log.Warn("command not answered", "subject", subject, "error", err)
			if errors.Is(err, errNoResponders) {
				w.Header().Set(commands.RetryAfterHeader, retryAfterNoResponders)
			}
			writeError(w, err)
			return
		}
		if after := reply.Header.Get(commands.RetryAfterHeader); after != "" {
			w.Header().Set(commands.RetryAfterHeader, after)
		}
		writeRaw(w, status, reply.Data)
	}
}

// request sends one command and returns the reply's status and the reply.
// No responder means nothing was recorded: that 503 says when to retry.
func (s *Server) request(ctx context.Context, msg *nats.Msg) (int, *nats.Msg, error) {
	subject := msg.Subject
	reply, err := s.cfg.Conn.RequestMsgWithContext(ctx, msg)
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return 0, nil, fmt.Errorf("%w (%w)", commands.Unavailable("command service unavailable: no responders on %s", subject).
			WithDetail("subject", subject), errNoResponders)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout):
		return 0, nil, commands.Unavailable("command service did not answer in time").
			WithDetail("subject", subject)
	case err != nil:
		return 0, nil, commands.Unavailable("command bus: %v", err).WithDetail("subject", subject)
	}
	status, convErr := strconv.Atoi(reply.Header.Get(commands.StatusHeader))
	if convErr != nil || status < 200 || status > 599 {
		return 0, nil, commands.Internal("command service replied without a valid %s header: %q",
			commands.StatusHeader, reply.Header.Get(commands.StatusHeader))
	}
	return status, reply, nil
}

// errNoResponders marks a command nobody received: nothing was recorded.
var errNoResponders = errors.New("nothing recorded")

// retryAfterNoResponders is the Retry-After, in seconds, of a command
// nobody received.
const retryAfterNoResponders = "1"

// readBody reads a request body of at most commands.MaxBodyBytes.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, commands.MaxBodyBytes))
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		return nil, commands.Invalid("", "request body is larger than %d bytes", commands.MaxBodyBytes).
			WithDetail("maximum_bytes", commands.MaxBodyBytes)
	case err != nil:
		return nil, commands.Invalid("", "cannot read request body: %v", err)
	}
	return body, nil
}

// withPathVolume merges the path's volume_id into a JSON object body
// (empty counts as {}). A body volume_id naming another volume is refused.
func withPathVolume(r *http.Request, body []byte) ([]byte, error) {
	raw, err := pathParam(r, "volume_id")
	if err != nil {
		return nil, err
	}
	volumeID, err := commands.NormalizeVolumeID(raw)
	if err != nil {
		return nil, err
	}
	fields := map[string]json.RawMessage{}
	if len(bytes.TrimSpace(body)) > 0 {
		if fields, err = decodeObject(body); err != nil {
			return nil, err
		}
	}
	if given, ok := fields["volume_id"]; ok {
		var s string
		if json.Unmarshal(given, &s) != nil {
			return nil, commands.Invalid("volume_id", "volume_id must be a string")
		}
		if bodyID, err := commands.NormalizeVolumeID(s); err != nil || bodyID != volumeID {
			return nil, commands.Invalid("volume_id", "volume_id in the body (%q) differs from the path (%q)", s, raw).
				WithDetail("provided_value", s)
		}
	}
	fields["volume_id"], _ = json.Marshal(volumeID)
	return json.Marshal(fields)
}

// decodeObject parses a body that must be exactly one JSON object.
func decodeObject(body []byte) (map[string]json.RawMessage, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	var fields map[string]json.RawMessage
	if err := dec.Decode(&fields); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return nil, commands.Invalid("", "request body must be a JSON object")
		}
		return nil, commands.Invalid("", "malformed JSON: %v", err)
	}
	if fields == nil {
		return nil, commands.Invalid("", "request body must be a JSON object")
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, commands.Invalid("", "request body must hold exactly one JSON object")
	}
	return fields, nil
}
