package cloudsim

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha1"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"
)

// CloudStack's cserrorcodes.
const (
	csPlain   = 9999 // plain API exception
	csInvalid = 4350 // wrapped InvalidParameterValueException
)

const (
	textBadCredentials = "unable to verify user credentials and/or request signature"
	textUnknownCommand = "The given command does not exist or it is not available for user"
	// timeLayout is CloudStack's timestamp format.
	timeLayout = "2006-01-02T15:04:05-0700"
)

// apiError is a CloudStack error: HTTP status = Code.
type apiError struct {
	Code   int
	CSCode int
	Text   string
}

func (e *apiError) Error() string { return fmt.Sprintf("%d: %s", e.Code, e.Text) }

// errParam is an InvalidParameterValueException (431/4350).
func errParam(format string, args ...any) *apiError {
	return &apiError{Code: 431, CSCode: csInvalid, Text: fmt.Sprintf(format, args...)}
}

// errInternal is a CloudRuntimeException (530).
func errInternal(format string, args ...any) *apiError {
	return &apiError{Code: 530, CSCode: csPlain, Text: fmt.Sprintf(format, args...)}
}

// body is the JSON of an error answer or a failed job's result.
func (e *apiError) body(withCS bool) map[string]any {
	m := map[string]any{"uuidList": []string{}, "errorcode": e.Code, "errortext": e.Text}
	if withCS && e.CSCode != 0 {
		m["cserrorcode"] = e.CSCode
	}
	return m
}

// request is a verified API request's parameters.
type request struct {
	cmd string
	v   url.Values
}

func (q request) str(name string) string { return q.v.Get(name) }

func (q request) invalid(name, value string) *apiError {
	return &apiError{Code: 431, CSCode: csPlain, Text: fmt.Sprintf("Unable to execute API command %s due to invalid value. "+
		"Invalid parameter %s value=%s due to incorrect long value format, or entity does not exist or due to "+
		"incorrect parameter annotation for the field in api cmd class.", strings.ToLower(q.cmd), name, value)}
}

// uuid reads an optional UUID parameter that must name an existing entity.
func (q request) uuid(name string, exists func(string) bool) (string, *apiError) {
	val := q.v.Get(name)
	if val == "" {
		return "", nil
	}
	if !isUUID(val) || !exists(val) {
		return "", q.invalid(name, val)
	}
	return val, nil
}

// required is uuid for a mandatory parameter.
func (q request) required(name string, exists func(string) bool) (string, *apiError) {
	if q.v.Get(name) == "" {
		return "", q.missing(name)
	}
	return q.uuid(name, exists)
}

// int reads an optional integer parameter.
func (q request) int(name string) (*int64, *apiError) {
	val := q.v.Get(name)
	if val == "" {
		return nil, nil
	}
	n, err := strconv.ParseInt(val, 10, 64)
	if err != nil {
		return nil, q.invalid(name, val)
	}
	return &n, nil
}

// handler runs a command and returns the value under "<command>response".
type handler func(s *Sim, q request) (any, *apiError)

var handlers = map[string]handler{
	"createVolume":        (*Sim).createVolume,
	"attachVolume":        (*Sim).attachVolume,
	"detachVolume":        (*Sim).detachVolume,
	"deleteVolume":        (*Sim).deleteVolume,
	"listVolumes":         (*Sim).listVolumes,
	"listVirtualMachines": (*Sim).listVirtualMachines,
	"listZones":           (*Sim).listZones,
	"listDiskOfferings":   (*Sim).listDiskOfferings,
	"queryAsyncJobResult": (*Sim).queryAsyncJobResult,
	"startVirtualMachine": (*Sim).startVirtualMachine,
	"stopVirtualMachine":  (*Sim).stopVirtualMachine,
	"listCapabilities":    (*Sim).listCapabilities,
	"createSnapshot":      (*Sim).createSnapshot,
	"listSnapshots":       (*Sim).listSnapshots,
	"deleteSnapshot":      (*Sim).deleteSnapshot,
	"revertSnapshot":      (*Sim).revertSnapshot,
	"resizeVolume":        (*Sim).resizeVolume,
	"createTags":          (*Sim).createTags,
	"deleteTags":          (*Sim).deleteTags,
	"listTags":            (*Sim).listTags,
}

// serveAPI is /client/api: faults, then signature, then the command.
func (s *Sim) serveAPI(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		writeJSON(w, 431, map[string]any{"errorresponse": errParam("bad request: %v", err).body(true)})
		return
	}
	cmd := r.Form.Get("command")
	s.mu.Lock()
	s.calls[cmd]++
	s.mu.Unlock()
	f := s.Faults()
	if f.Outage {
		dropConn(w)
		return
	}
	if d, ok := lookup(f.Latency, cmd); ok && d > 0 {
		t := time.NewTimer(time.Duration(d))
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	kind := s.injectedError(f, cmd)
	key := strings.ToLower(cmd) + "response"
	switch kind {
	case ErrorKindDrop:
		dropConn(w)
		return
	case ErrorKind530, ErrorKind431:
		code, _ := strconv.Atoi(kind)
		e := &apiError{Code: code, CSCode: csPlain, Text: "injected fault (cloudsim)"}
		writeJSON(w, code, map[string]any{key: e.body(true)})
		return
	}
	status, body := s.handle(r.Form)
	s.log.Debug("api", "command", cmd, "status", status)
	if kind == ErrorKindDropAfter {
		dropConn(w)
		return
	}
	writeJSON(w, status, body)
}

// injectedError draws whether this call fails, and how.
func (s *Sim) injectedError(f Faults, cmd string) string {
	e, ok := lookup(f.Errors, cmd)
	if !ok || e.Rate <= 0 {
		return ""
	}
	if s.chance(e.Rate) {
		return e.Kind
	}
	return ""
}

// chance draws true with probability p from the seeded source.
func (s *Sim) chance(p float64) bool {
	if p <= 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rng.Float64() < p
}

// handle verifies the request and runs the command.
func (s *Sim) handle(form url.Values) (int, map[string]any) {
	cmd := form.Get("command")
	key := strings.ToLower(cmd) + "response"
	if !s.verify(form, time.Now()) {
		return 401, map[string]any{key: (&apiError{Code: 401, Text: textBadCredentials}).body(false)}
	}
	h, ok := handlers[cmd]
	if !ok {
		return 432, map[string]any{key: (&apiError{Code: 432, CSCode: csPlain, Text: textUnknownCommand}).body(true)}
	}
	out, aerr := h(s, request{cmd: cmd, v: form})
	if aerr != nil {
		return aerr.Code, map[string]any{key: aerr.body(true)}
	}
	return http.StatusOK, map[string]any{key: out}
}

// verify checks the key, the signature and, for signatureversion 3, that
// expires has not passed, as CloudStack's ApiServer does.
func (s *Sim) verify(form url.Values, now time.Time) bool {
	sig := form.Get("signature")
	var key string
	for k, vs := range form {
		if strings.EqualFold(k, "apikey") && len(vs) > 0 {
			key = vs[0]
		}
	}
	if sig == "" || key != s.cfg.APIKey {
		return false
	}
	if form.Get("signatureversion") == "3" {
		exp, ok := parseExpires(form.Get("expires"))
		if !ok || now.After(exp) {
			return false
		}
	}
	unsigned := url.Values{}
	for k, vs := range form {
		if k != "signature" {
			unsigned[k] = vs
		}
	}
	mac := hmac.New(sha1.New, []byte(s.cfg.SecretKey))
	mac.Write([]byte(strings.ToLower(cloudstack.EncodeValues(unsigned))))
	want := base64.StdEncoding.EncodeToString(mac.Sum(nil))
	return hmac.Equal([]byte(sig), []byte(want))
}

// parseExpires reads RFC 3339 ("…Z") or CloudStack's "…+0000".
func parseExpires(v string) (time.Time, bool) {
	for _, layout := range []string{time.RFC3339, timeLayout} {
		if t, err := time.Parse(layout, v); err == nil {
			return t, true
		}
	}
	return time.Time{}, false
}

func writeJSON(w http.ResponseWriter, status int, body any) {
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(body); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

// dropConn closes the connection without an answer.
func dropConn(w http.ResponseWriter) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		panic(http.ErrAbortHandler)
	}
	conn, _, err := hj.Hijack()
	if err != nil {
		panic(http.ErrAbortHandler)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = conn.Close()
}

// serveFaults is GET/PUT /_sim/faults.
func (s *Sim) serveFaults(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet:
	case http.MethodPut:
		var f Faults
		dec := json.NewDecoder(r.Body)
		dec.DisallowUnknownFields()
		if err := dec.Decode(&f); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if err := s.SetFaults(f); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		s.log.Info("faults set", "faults", f)
	default:
		w.Header().Set("Allow", "GET, PUT")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	writeJSON(w, http.StatusOK, s.Faults())
}

// serveStats is GET /_sim/stats.
func (s *Sim) serveStats(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", "GET")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	writeJSON(w, http.StatusOK, s.Stats())
}
