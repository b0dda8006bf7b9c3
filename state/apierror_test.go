package state_test

import (
	"errors"
	"fmt"
	"net/http"
	"testing"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

func TestAPIError(t *testing.T) {
	tests := []struct {
		err    error
		status int
		code   string
	}{
		{fmt.Errorf("redis: %w", state.ErrUnavailable), http.StatusServiceUnavailable, commands.CodeServiceUnavailable},
		{fmt.Errorf("op x: %w", state.ErrNotFound), http.StatusNotFound, commands.CodeNotFound},
		{fmt.Errorf("device: %w", state.ErrConflict), http.StatusConflict, commands.CodeConflict},
		{fmt.Errorf("op x: %w", state.ErrStale), http.StatusConflict, commands.CodeConflict},
		{fmt.Errorf("op x: %w: %w", state.ErrStale, state.ErrNotFound), http.StatusNotFound, commands.CodeNotFound},
		{fmt.Errorf("op x: %w", state.ErrTransition), http.StatusConflict, commands.CodeConflict},
		{fmt.Errorf("lease: %w", state.ErrLeaseHeld), http.StatusConflict, commands.CodeConflict},
		{fmt.Errorf("wrapped: %w", commands.Invalid("size", "too small")), http.StatusBadRequest, commands.CodeInvalidRequest},
		{errors.New("disk on fire"), http.StatusInternalServerError, commands.CodeInternalError},
	}
	for _, tc := range tests {
		if e := state.APIError(tc.err); e.Status != tc.status || e.Code != tc.code || e.Message == "" {
			t.Errorf("APIError(%v) = %+v, want %d %s", tc.err, e, tc.status, tc.code)
		}
	}
}
