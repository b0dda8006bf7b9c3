package state

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestKVErrUnavailable: what a cluster says while it cannot serve yet, and
// a request nobody answered, are ErrUnavailable (NewKV asks again); an
// answer about the request itself is not.
func TestKVErrUnavailable(t *testing.T) {
	for _, tc := range []struct {
		err         error
		unavailable bool
	}{
		{&jetstream.APIError{Code: 503, ErrorCode: jsClusterNotAvail, Description: "JetStream system temporarily unavailable"}, true},
		{&jetstream.APIError{Code: 400, ErrorCode: jsClusterNoPeers, Description: "no suitable peers for placement"}, true},
		{&jetstream.APIError{Code: 500, ErrorCode: jsClusterNotLeader, Description: "JetStream cluster can not handle request"}, true},
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
		if !errors.Is(err, tc.err) {
			t.Errorf("%v: the cause is lost in %v", tc.err, err)
		}
	}
}
