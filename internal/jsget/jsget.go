// Package jsget reads a stream's messages where direct gets may be turned
// off while volumed runs.
package jsget

import (
	"context"
	"errors"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Get returns get's message. When no server answered get as a direct get
// (an instance started with more replicas turned direct gets off since),
// it learns the stream's config and calls get once more, which then asks
// the leader.
func Get(ctx context.Context, s jetstream.Stream, get func() (*jetstream.RawStreamMsg, error)) (*jetstream.RawStreamMsg, error) {
	msg, err := get()
	if errors.Is(err, nats.ErrNoResponders) && s.CachedInfo().Config.AllowDirect {
		if _, ierr := s.Info(ctx); ierr == nil {
			msg, err = get()
		}
	}
	return msg, err
}
