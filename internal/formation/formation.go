// Package formation runs the JetStream set-up that must wait for a
// cluster still forming: its streams and the state bucket.
package formation

import (
	"context"
	"time"

	"github.com/volumed/volumed/internal/backoff"
)

// Budget is how long set-up waits for a forming cluster: members started
// one by one by an operator join within it.
const Budget = time.Minute

// Retry calls attempt until it succeeds, retryable says its error is
// final, or ctx ends; then it returns attempt's last error. Each attempt
// has its own deadline, 1 s doubling to maxTry: until a cluster has a
// leader, requests go unanswered, and of several members making the same
// stream at once only one hears back, so a short first deadline asks
// again soon. Attempts are 100 ms apart, doubling to 1 s.
func Retry(ctx context.Context, maxTry time.Duration, retryable func(error) bool, attempt func(ctx context.Context) error) error {
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
