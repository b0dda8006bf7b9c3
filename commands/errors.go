package commands

import (
	"errors"
	"fmt"
	"net/http"
)

// Error codes of the documented error format.
const (
	CodeInvalidRequest     = "INVALID_REQUEST"
	CodeNotFound           = "NOT_FOUND"
	CodeConflict           = "CONFLICT"
	CodeCloudStackError    = "CLOUDSTACK_ERROR"
	CodeInternalError      = "INTERNAL_ERROR"
	CodeServiceUnavailable = "SERVICE_UNAVAILABLE"
)

// Error is an API error in the documented format:
// {"error": "...", "code": "...", "details": {...}}. Status is the HTTP
// status; it travels in the StatusHeader header on NATS, not in the body.
type Error struct {
	Status int `json:"-"`
	// Message says what went wrong, for people.
	Message string `json:"error"`
	// Code is one of the Code constants, e.g. "NOT_FOUND".
	Code string `json:"code"`
	// Details qualifies the error, e.g. the offending "field".
	Details map[string]any `json:"details,omitempty"`
}

var _ error = (*Error)(nil)

// Error is the code and the message.
func (e *Error) Error() string { return e.Code + ": " + e.Message }

// WithDetail adds one detail and returns e.
func (e *Error) WithDetail(key string, value any) *Error {
	if e.Details == nil {
		e.Details = map[string]any{}
	}
	e.Details[key] = value
	return e
}

func newError(status int, code, format string, args ...any) *Error {
	return &Error{Status: status, Code: code, Message: fmt.Sprintf(format, args...)}
}

// Invalid is a 400 INVALID_REQUEST about one field.
func Invalid(field, format string, args ...any) *Error {
	e := newError(http.StatusBadRequest, CodeInvalidRequest, format, args...)
	if field != "" {
		e.WithDetail("field", field)
	}
	return e
}

// NotFound is a 404 NOT_FOUND.
func NotFound(format string, args ...any) *Error {
	return newError(http.StatusNotFound, CodeNotFound, format, args...)
}

// Conflict is a 409 CONFLICT.
func Conflict(format string, args ...any) *Error {
	return newError(http.StatusConflict, CodeConflict, format, args...)
}

// CloudStack is a 422 CLOUDSTACK_ERROR.
func CloudStack(format string, args ...any) *Error {
	return newError(http.StatusUnprocessableEntity, CodeCloudStackError, format, args...)
}

// Internal is a 500 INTERNAL_ERROR.
func Internal(format string, args ...any) *Error {
	return newError(http.StatusInternalServerError, CodeInternalError, format, args...)
}

// Unavailable is a 503 SERVICE_UNAVAILABLE.
func Unavailable(format string, args ...any) *Error {
	return newError(http.StatusServiceUnavailable, CodeServiceUnavailable, format, args...)
}

// AsError returns err as an *Error, wrapping anything else as INTERNAL_ERROR.
func AsError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return Internal("%v", err)
}

// CodeTimeout is the error code of an operation whose step passed its
// deadline. It appears in an operation's details, never as an HTTP error.
const CodeTimeout = "TIMEOUT"

// Timeout is a step that passed its deadline (code TIMEOUT, status 504).
func Timeout(format string, args ...any) *Error {
	return newError(http.StatusGatewayTimeout, CodeTimeout, format, args...)
}

// Codes of the REST API's own refusals (never an operation's).
const (
	// CodeUnauthorized: the bearer token is missing or wrong.
	CodeUnauthorized = "UNAUTHORIZED"
	// CodeForbidden: a cross-site request.
	CodeForbidden = "FORBIDDEN"
)

// Unauthorized is a 401 UNAUTHORIZED.
func Unauthorized(format string, args ...any) *Error {
	return newError(http.StatusUnauthorized, CodeUnauthorized, format, args...)
}

// Forbidden is a 403 FORBIDDEN.
func Forbidden(format string, args ...any) *Error {
	return newError(http.StatusForbidden, CodeForbidden, format, args...)
}
