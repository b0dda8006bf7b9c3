package client

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/volumed/volumed/commands"
)

// Error is an answer of the API other than 2xx: its HTTP status and the
// documented error document (code, message, details).
type Error struct {
	// Status is the HTTP status.
	Status int
	// API is the error document; for a body not in the documented format
	// (a proxy's page), Code is "" and Message is the body's start.
	API *commands.Error
	// RetryAfter is the server's Retry-After, zero when it sent none.
	RetryAfter time.Duration
	// Body is the answer as it came.
	Body []byte
}

var _ error = (*Error)(nil)

// Error implements error: "HTTP 404 NOT_FOUND: volume … not found".
func (e *Error) Error() string {
	if e.API.Code == "" {
		return fmt.Sprintf("HTTP %d: %s", e.Status, e.API.Message)
	}
	return fmt.Sprintf("HTTP %d %s: %s", e.Status, e.API.Code, e.API.Message)
}

// Unwrap returns the error document, so errors.As finds a *commands.Error.
func (e *Error) Unwrap() error { return e.API }

// Code is the error code (commands.CodeNotFound, …).
func (e *Error) Code() string { return e.API.Code }

// Details is the error's details object; nil when it had none.
func (e *Error) Details() map[string]any { return e.API.Details }

// HasCode reports whether err is an API error with code.
func HasCode(err error, code string) bool {
	var e *Error
	return errors.As(err, &e) && e.API.Code == code
}

// decodeError builds the *Error of a non-2xx answer.
func decodeError(resp *http.Response, body []byte) *Error {
	e := &Error{Status: resp.StatusCode, Body: body, API: &commands.Error{Status: resp.StatusCode}}
	if json.Unmarshal(body, e.API) != nil || e.API.Code == "" {
		e.API = &commands.Error{Status: resp.StatusCode,
			Message: commands.Shown(strings.TrimSpace(string(body)), 200)}
		if e.API.Message == "" {
			e.API.Message = http.StatusText(resp.StatusCode)
		}
	}
	e.API.Status = resp.StatusCode
	if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s >= 0 {
		e.RetryAfter = time.Duration(s) * time.Second
	}
	return e
}
