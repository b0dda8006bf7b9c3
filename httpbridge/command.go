package httpbridge

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"

	"github.com/volumed/volumed/commands"
)

// command returns a handler that runs the command of subject with the
// request body through Config.Commands and answers what it answers: the
// status, the JSON, and a 503's Retry-After. The Idempotency-Key header
// goes along. withVolume handlers take volume_id from the path and merge
// it into the body. The command service bounds the command: an accepted
// one runs to its answer whatever the client does, since its answer says
// what was recorded; a force-sync stops when the client goes away.
func (s *Server) command(subject string, withVolume bool) http.HandlerFunc {
	if withVolume {
		return s.commandOn(subject, pathMerge{param: "volume_id", field: "volume_id", normalize: commands.NormalizeVolumeID})
	}
	return s.commandOn(subject, pathMerge{})
}

// pathMerge is a path parameter merged into a command's body: param, the
// path's parameter, validated by normalize, goes into the body's field.
// The zero pathMerge merges nothing.
type pathMerge struct {
	param, field string
	normalize    func(string) (string, error)
}

// commandOn is command with the path's id merged into the body.
func (s *Server) commandOn(subject string, id pathMerge) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := readBody(w, r)
		if err != nil {
			writeError(w, err)
			return
		}
		if id.param != "" {
			if body, err = withPathID(r, body, id); err != nil {
				writeError(w, err)
				return
			}
		}
		a := s.cfg.Commands.Command(r.Context(), subject, body, r.Header.Get(commands.IdempotencyKeyHeader))
		if a.RetryAfter != "" {
			w.Header().Set(commands.RetryAfterHeader, a.RetryAfter)
		}
		writeRaw(w, a.Status, a.Body)
	}
}

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

// withPathID merges the path's id parameter, validated, into a JSON
// object body (empty counts as {}) under its field. A body field naming
// another id is refused.
func withPathID(r *http.Request, body []byte, p pathMerge) ([]byte, error) {
	id, err := pathID(r, p.param, p.normalize)
	if err != nil {
		return nil, err
	}
	fields := map[string]json.RawMessage{}
	if len(bytes.TrimSpace(body)) > 0 {
		if fields, err = decodeObject(body); err != nil {
			return nil, err
		}
	}
	if given, ok := fields[p.field]; ok {
		var s string
		if json.Unmarshal(given, &s) != nil {
			return nil, commands.Invalid(p.field, "%s must be a string", p.field)
		}
		if bodyID, err := p.normalize(s); err != nil || bodyID != id {
			return nil, commands.Invalid(p.field, "%s in the body (%q) differs from the path (%q)", p.field, s, id).
				WithDetail("provided_value", s)
		}
	}
	fields[p.field], _ = json.Marshal(id)
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
