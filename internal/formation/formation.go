// Package formation runs the JetStream set-up that must wait for a
// cluster still forming or a member catching up: its streams, the state
// bucket, the consumers and every other request start-up makes.
package formation

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/volumed/volumed/internal/backoff"
)

// Budget is how long set-up waits for a forming cluster: members started
// one by one by an operator join within it.
const Budget = time.Minute

// maxTry bounds one attempt of Wait.
const maxTry = 4 * time.Second

// retry calls attempt until it succeeds, retryable says its error is
// final, or ctx ends; then it returns attempt's last error. Each attempt
// has its own deadline, 1 s doubling to maxTry: until a cluster has a
// leader, requests go unanswered, and of several members making the same
// stream at once only one hears back, so a short first deadline asks
// again soon. Attempts are 100 ms apart, doubling to 1 s.
func retry(ctx context.Context, maxTry time.Duration, retryable func(error) bool, attempt func(ctx context.Context) error) error {
	pauses := backoff.Policy{Min: 100 * time.Millisecond, Max: time.Second}.Start()
	tries := backoff.Policy{Min: time.Second, Max: max(maxTry, time.Second)}.Start()
	for {
		tryCtx, cancel := context.WithTimeout(ctx, tries.Next())
		err := attempt(tryCtx)
		cancel()
		if err == nil || !retryable(err) || ctx.Err() != nil {
			return err
		}
		if !pauses.Wait(ctx, 0) {
			return err
		}
	}
}

// Wait runs attempt as retry does, within Budget, for as long as its error
// is one of Transient's; log gets each retried error at debug level, with
// what names the request.
func Wait(ctx context.Context, log *slog.Logger, what string, attempt func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, Budget)
	defer cancel()
	return retry(ctx, maxTry, func(err error) bool {
		if !Transient(err) {
			return false
		}
		log.Debug("jetstream not ready yet", "request", what, "err", err)
		return true
	}, attempt)
}

// transientCodes are the JetStream errors of a cluster without a leader,
// without enough members, or whose member has not caught up yet, and of a
// publish whose earlier attempt (an answer that did not come in time) is
// still being stored: asked again, it is stored or a duplicate.
var transientCodes = map[jetstream.ErrorCode]bool{
	10005: true, // JSClusterNoPeersErrF: not enough peers for the replicas
	10006: true, // JSClusterNotActiveErr
	10008: true, // JSClusterNotAvailErr
	10009: true, // JSClusterNotLeaderErr
	10023: true, // JSInsufficientResourcesErr: peers still joining
	10040: true, // JSClusterPeerNotMemberErr
	10041: true, // JSRaftGeneralErrF
	10118: true, // JSStreamOfflineErr
	10119: true, // JSConsumerOfflineErr
	10158: true, // JSStreamDuplicateMessageConflict: the same message id is being stored
	10194: true, // JSStreamOfflineReasonErrF
	10195: true, // JSConsumerOfflineReasonErrF
}

// Transient reports whether err is an answer a forming or catching-up
// cluster gives for a while: no answer in time, nobody answering, or a
// JetStream error of a cluster not ready (a 503, or one of transientCodes),
// or an error marked NotYet.
func Transient(err error) bool {
	var apiErr *jetstream.APIError
	switch {
	case err == nil:
		return false
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout),
		errors.Is(err, nats.ErrNoResponders), errors.Is(err, jetstream.ErrNoStreamResponse),
		errors.Is(err, nats.ErrConnectionReconnecting):
		return true
	case errors.As(err, new(notYet)):
		return true
	case errors.As(err, &apiErr):
		return apiErr.Code == 503 || transientCodes[apiErr.ErrorCode]
	}
	return false
}

// NotYet marks err as the answer of a server that has not yet learned what
// the cluster has just made (a stream another member created a moment
// before), which Transient then takes for transient.
func NotYet(err error) error { return notYet{err} }

type notYet struct{ error }

func (e notYet) Unwrap() error { return e.error }
