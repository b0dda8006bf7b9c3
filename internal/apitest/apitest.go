// Package apitest checks HTTP responses against volumed's OpenAPI
// document (httpbridge/openapi.json) with kin-openapi: every response's
// status must be declared for its route and its body must match the
// declared schema, or the test fails.
package apitest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"

	"github.com/volumed/volumed/httpbridge"
)

// RequestTimeout bounds one request made by Do.
const RequestTimeout = 30 * time.Second

// Validator validates responses against the OpenAPI document. It is safe
// for concurrent use by parallel subtests.
type Validator struct {
	doc    *openapi3.T
	router routers.Router

	mu sync.Mutex
	// seen counts the responses checked per documented operation
	// ("METHOD /path").
	seen map[string]int
}

// New loads and validates httpbridge's OpenAPI document; it fails the test
// if the document is invalid.
func New(t testing.TB) *Validator {
	t.Helper()
	v, err := Load()
	if err != nil {
		t.Fatalf("apitest: %v", err)
	}
	return v
}

// Load is New for code without a testing.TB, such as TestMain.
func Load() (*Validator, error) {
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData(httpbridge.OpenAPI())
	if err != nil {
		return nil, fmt.Errorf("load OpenAPI document: %w", err)
	}
	if err := doc.Validate(loader.Context); err != nil {
		return nil, fmt.Errorf("OpenAPI document is invalid: %w", err)
	}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		return nil, fmt.Errorf("OpenAPI router: %w", err)
	}
	return &Validator{doc: doc, router: router, seen: map[string]int{}}, nil
}

// NewRequest builds a request with a JSON body ("" for none); it fails the
// test on a malformed URL.
func NewRequest(t testing.TB, method, url, body string) *http.Request {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatalf("apitest: request %s %s: %v", method, url, err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	return req
}

// Do sends req with client (http.DefaultClient when nil) under
// RequestTimeout unless req already has a deadline, reads the whole body,
// and checks the response with Check. It fails the test if the request
// cannot be made.
func (v *Validator) Do(t testing.TB, client *http.Client, req *http.Request) (*http.Response, []byte) {
	t.Helper()
	if client == nil {
		client = http.DefaultClient
	}
	if _, ok := req.Context().Deadline(); !ok {
		ctx, cancel := context.WithTimeout(req.Context(), RequestTimeout)
		defer cancel()
		req = req.WithContext(ctx)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("apitest: %s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("apitest: %s %s: read body: %v", req.Method, req.URL, err)
	}
	v.Check(t, req, resp, body)
	return resp, body
}

// Check fails the test unless the response to req is what the document
// promises: JSON, a status declared for the route, and a body matching
// that status's schema. A request the document has no route for must be
// answered 404 NOT_FOUND (unknown path) or 405 with an Allow header (known
// path, other method), in the Error format, unless the bridge refused it
// before routing (401 UNAUTHORIZED, 403 FORBIDDEN).
func (v *Validator) Check(t testing.TB, req *http.Request, resp *http.Response, body []byte) {
	t.Helper()
	if err := v.check(req, resp, body); err != nil {
		t.Errorf("apitest: %s %s → %d violates the OpenAPI document: %v\nbody: %s",
			req.Method, req.URL.RequestURI(), resp.StatusCode, err, truncate(body, 2000))
	}
}

func (v *Validator) check(req *http.Request, resp *http.Response, body []byte) error {
	ct, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if err != nil || ct != "application/json" {
		return errors.New("Content-Type is " + resp.Header.Get("Content-Type") + ", want application/json")
	}
	route, params, err := v.router.FindRoute(req)
	unrouted := errors.Is(err, routers.ErrPathNotFound) || errors.Is(err, routers.ErrMethodNotAllowed)
	if code, ok := refusals[resp.StatusCode]; ok && unrouted {
		return v.checkUnrouted(resp, body, resp.StatusCode, code)
	}
	switch {
	case errors.Is(err, routers.ErrPathNotFound):
		return v.checkUnrouted(resp, body, http.StatusNotFound, "NOT_FOUND")
	case errors.Is(err, routers.ErrMethodNotAllowed):
		if resp.Header.Get("Allow") == "" {
			return errors.New("405 without an Allow header")
		}
		return v.checkUnrouted(resp, body, http.StatusMethodNotAllowed, "")
	case err != nil:
		return err
	}
	v.mu.Lock()
	v.seen[route.Method+" "+route.Path]++
	v.mu.Unlock()
	in := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route},
		Status:                 resp.StatusCode,
		Header:                 resp.Header,
		Body:                   io.NopCloser(bytes.NewReader(body)),
		Options:                &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true},
	}
	return openapi3filter.ValidateResponse(context.Background(), in)
}

// refusals are the bridge's answers before routing, with their codes.
var refusals = map[int]string{http.StatusUnauthorized: "UNAUTHORIZED", http.StatusForbidden: "FORBIDDEN"}

// checkUnrouted checks a response to a request no documented operation
// matches: the wanted status and an Error body (with code, when given).
func (v *Validator) checkUnrouted(resp *http.Response, body []byte, status int, code string) error {
	if resp.StatusCode != status {
		return errors.New("no documented operation matches, but the status is not " + http.StatusText(status))
	}
	var value any
	if err := json.Unmarshal(body, &value); err != nil {
		return err
	}
	if err := v.doc.Components.Schemas["Error"].Value.VisitJSON(value); err != nil {
		return err
	}
	if m, _ := value.(map[string]any); code != "" && m["code"] != code {
		return errors.New("error code is not " + code)
	}
	return nil
}

// Unexercised lists the documented operations ("METHOD /path") that no
// checked response has matched yet, sorted.
func (v *Validator) Unexercised() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	var out []string
	for path, item := range v.doc.Paths.Map() {
		for method := range item.Operations() {
			if key := method + " " + path; v.seen[key] == 0 {
				out = append(out, key)
			}
		}
	}
	slices.Sort(out)
	return out
}

func truncate(b []byte, n int) string {
	if len(b) <= n {
		return string(b)
	}
	return string(b[:n]) + "…"
}
