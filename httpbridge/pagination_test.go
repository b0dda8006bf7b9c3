package httpbridge_test

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/redisstore"
)

// TestOperationsPagination seeds 250 operations and walks GET /operations
// by cursor, with both stores: 100 a page by default, every operation once,
// newest first across pages, the next page named by X-Next-Cursor and Link
// until the last, filters kept, and a foreign cursor refused.
func TestOperationsPagination(t *testing.T) {
	stores := map[string]func(t *testing.T) state.Store{
		"embedded": func(*testing.T) state.Store { return nil },
		"redis": func(t *testing.T) state.Store {
			rs, err := redisstore.New(context.Background(), redisstore.Config{URL: testenv.StartRedis(t).URL(), Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = rs.Close(context.Background()) })
			return rs
		},
	}
	for name, store := range stores {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t, options{store: store(t)})
			const total = 250
			for i := range total {
				status := commands.StatusCompleted
				if i%2 == 1 {
					status = commands.StatusPending
				}
				h.seedOperation(t, fmt.Sprintf("op-00000000-0000-4000-8000-%012d", i), commands.OpCreate, status, "", "", i)
			}
			pages, all := h.walkOperations(t, "", total)
			if fmt.Sprint(pages) != "[100 100 50]" {
				t.Fatalf("page sizes %v, want [100 100 50]", pages)
			}
			seen := map[string]bool{}
			for i, op := range all {
				if seen[op.ID] {
					t.Fatalf("operation %s listed twice", op.ID)
				}
				seen[op.ID] = true
				if i > 0 && !op.CreatedAt.Before(all[i-1].CreatedAt) {
					t.Fatalf("row %d (%s) not older than the one before", i, op.CreatedAt)
				}
			}
			pages, all = h.walkOperations(t, "?status=pending&limit=30", total)
			if len(all) != total/2 || pages[0] != 30 || len(pages) != 5 {
				t.Fatalf("pending pages %v (%d rows), want 125 rows 30 a page", pages, len(all))
			}
			for _, op := range all {
				if op.Status != commands.StatusPending {
					t.Fatalf("filter lost across pages: %+v", op)
				}
			}
			resp, body := h.do(t, http.MethodGet, "/operations?cursor=not-a-cursor", "")
			if e := decodeAs[commands.Error](t, body); resp.StatusCode != http.StatusBadRequest || e.Details["field"] != "cursor" {
				t.Fatalf("foreign cursor: %d %s", resp.StatusCode, body)
			}
		})
	}
}

// walkOperations walks GET /operations with query page by page, through
// the Link of each, and returns the size of each page and every row. It
// fails the test on a Link that does not name the X-Next-Cursor page, a
// last page with a Link, or no last page after maxPages.
func (h *harness) walkOperations(t *testing.T, query string, maxPages int) (pages []int, all []commands.OperationSummary) {
	t.Helper()
	path := "/operations" + query
	for range maxPages {
		resp, body := h.do(t, http.MethodGet, path, "")
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %d %s", path, resp.StatusCode, body)
		}
		rows := decodeAs[[]commands.OperationSummary](t, body)
		pages, all = append(pages, len(rows)), append(all, rows...)
		next := resp.Header.Get(commands.NextCursorHeader)
		link := resp.Header.Get("Link")
		if next == "" {
			if link != "" {
				t.Fatalf("last page with a Link: %s", link)
			}
			return pages, all
		}
		if !strings.HasSuffix(link, `>; rel="next"`) || !strings.Contains(link, "cursor="+url.QueryEscape(next)) {
			t.Fatalf("Link %q does not name the next page (cursor %q)", link, next)
		}
		u, err := url.Parse(strings.TrimSuffix(strings.TrimPrefix(link, "<"), `>; rel="next"`))
		if err != nil {
			t.Fatal(err)
		}
		path = "/operations?" + u.RawQuery
	}
	t.Fatalf("no last page after %d pages", maxPages)
	return nil, nil
}

// TestOperationsPastCorruptPage: on Redis, which keeps a corrupt
// operation in its indexes, GET /operations?limit=1 over a corrupt
// newest operation answers an empty page that still names the next one
// (X-Next-Cursor and Link), and the walk reaches the operation behind it.
func TestOperationsPastCorruptPage(t *testing.T) {
	r := testenv.StartRedis(t)
	rs, err := redisstore.New(context.Background(), redisstore.Config{URL: r.URL(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rs.Close(context.Background()) })
	raw := redis.NewClient(&redis.Options{Addr: r.Addr})
	t.Cleanup(func() { _ = raw.Close() })
	h := newHarness(t, options{store: rs})
	var ids []string
	for i := range 3 {
		ids = append(ids, h.seedOperation(t, fmt.Sprintf("op-00000000-0000-4000-8000-%012d", i), commands.OpCreate, commands.StatusPending, "", "", i).ID)
	}
	for _, id := range ids[1:] {
		if err := raw.HSet(context.Background(), redisstore.DefaultPrefix+"op:"+id, "j", "{not json").Err(); err != nil {
			t.Fatal(err)
		}
	}
	pages, all := h.walkOperations(t, "?limit=1", 5)
	if fmt.Sprint(pages) != "[0 0 1]" || all[0].ID != ids[0] {
		t.Fatalf("pages %v of %v, want [0 0 1]: two empty pages over the corrupt operations, then %s", pages, all, ids[0])
	}
}
