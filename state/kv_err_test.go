package state

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/internal/formation"
)

// TestKVErrUnavailable: what a cluster says while it cannot serve yet
// (every answer formation.Transient passes, the stream offline codes
// among them), and a request nobody answered, are ErrUnavailable, and the
// bucket's set-up (formation.Wait) asks them again; an answer about the
// request itself is neither.
func TestKVErrUnavailable(t *testing.T) {
	for _, tc := range []struct {
		err         error
		unavailable bool
	}{
		{&jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}, true},
		{&jetstream.APIError{Code: 400, ErrorCode: 10005, Description: "no suitable peers for placement"}, true},
		{&jetstream.APIError{Code: 500, ErrorCode: 10009, Description: "JetStream cluster can not handle request"}, true},
		{&jetstream.APIError{Code: 500, ErrorCode: 10041, Description: "raft general error"}, true},
		{&jetstream.APIError{Code: 500, ErrorCode: 10118, Description: "stream is offline"}, true},
		{&jetstream.APIError{Code: 500, ErrorCode: 10194, Description: "stream is offline: catching up"}, true},
		{&jetstream.APIError{Code: 503, ErrorCode: 10023, Description: "insufficient resources"}, true},
		{context.DeadlineExceeded, true},
		{nats.ErrNoResponders, true},
		{jetstream.ErrStreamNotFound, false},
		{&jetstream.APIError{Code: 400, ErrorCode: jetstream.JSErrCodeStreamNameInUse, Description: "stream name already in use"}, false},
		{context.Canceled, false},
	} {
		err := kvErr("test", fmt.Errorf("wrapped: %w", tc.err))
		if got := errors.Is(err, ErrUnavailable); got != tc.unavailable {
			t.Errorf("%v: unavailable %v, want %v", tc.err, got, tc.unavailable)
		}
		if got := formation.Transient(err); got != tc.unavailable {
			t.Errorf("%v: the bucket set-up asks again %v, want %v", tc.err, got, tc.unavailable)
		}
		if !errors.Is(err, tc.err) {
			t.Errorf("%v: the cause is lost in %v", tc.err, err)
		}
	}
}
