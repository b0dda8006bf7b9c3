package handlers

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/volumed/volumed/commands"
)

// TestServedEverywhereWithoutAnswers: when no instance answers service
// discovery (none is registered here: NATS answers no responders),
// whether every instance serves the subject is not known, and the command
// is refused 503 rather than accepted; its own pre-checks ran beside, and
// the refusal wins over their error.
func TestServedEverywhereWithoutAnswers(t *testing.T) {
	s := newTestService(t)
	checked := false
	check := s.servedEverywhere(commands.SubjectFailover, func(context.Context, context.Context) error {
		checked = true
		return commands.Conflict("the pre-check's own refusal")
	})
	ctx, cancel := context.WithTimeout(context.Background(), commands.AcceptTimeout)
	defer cancel()
	err := commands.AsError(check(ctx, ctx))
	if err.Status != http.StatusServiceUnavailable || !strings.Contains(err.Message, "no volumed instance answered") || !checked {
		t.Fatalf("got %v (pre-check ran: %v), want 503 saying no instance answered", err, checked)
	}
}
