package state

import (
	"errors"

	"github.com/volumed/volumed/commands"
)

// APIError maps a store error to the documented API error, once for both
// edges (REST and NATS): ErrUnavailable is 503 SERVICE_UNAVAILABLE,
// ErrNotFound 404, ErrConflict, ErrStale, ErrTransition and ErrLeaseHeld
// 409; ErrCorrupt 500 INTERNAL_ERROR naming the record's key and the
// repair; an *commands.Error passes through and anything else is 500
// INTERNAL_ERROR.
func APIError(err error) *commands.Error {
	var e *commands.Error
	switch {
	case errors.As(err, &e):
		return e
	case errors.Is(err, ErrUnavailable):
		return commands.Unavailable("state store unavailable: %v", err)
	case errors.Is(err, ErrNotFound):
		return commands.NotFound("%v", err)
	case errors.Is(err, ErrConflict), errors.Is(err, ErrStale), errors.Is(err, ErrTransition), errors.Is(err, ErrLeaseHeld):
		return commands.Conflict("%v", err)
	case errors.Is(err, ErrCorrupt):
		return commands.Internal("%v (POST /admin/force-sync repairs a mapping or export record)", err)
	}
	return commands.Internal("%v", err)
}
