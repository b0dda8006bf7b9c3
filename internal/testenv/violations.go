package testenv

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// Violations records the permission violations a NATS server reports to
// a client: pass Handler as its nats.ErrorHandler.
type Violations struct {
	mu   sync.Mutex
	errs []string
}

// Handler is the connection's error handler.
func (v *Violations) Handler(_ *nats.Conn, _ *nats.Subscription, err error) {
	if errors.Is(err, nats.ErrPermissionViolation) {
		v.mu.Lock()
		v.errs = append(v.errs, err.Error())
		v.mu.Unlock()
	}
}

// Of reports whether a violation names subject.
func (v *Violations) Of(subject string) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, e := range v.errs {
		if strings.Contains(e, `"`+subject+`"`) {
			return true
		}
	}
	return false
}

// Await fails the test unless a violation on subject is reported within
// 30 s (the server's report is asynchronous, and CI is loaded).
func (v *Violations) Await(t testing.TB, subject string) {
	t.Helper()
	Eventually(t, 30*time.Second, func() bool { return v.Of(subject) }, "permission violation reported for %s", subject)
}

// Refused runs a call that must fail (within 2 s) and requires the server
// to report a permission violation on subject.
func (v *Violations) Refused(t testing.TB, subject string, call func(ctx context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := call(ctx); err == nil {
		t.Fatalf("%s succeeded, want it refused", subject)
	}
	v.Await(t, subject)
}
