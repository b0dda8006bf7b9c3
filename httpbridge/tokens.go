package httpbridge

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
)

// DefaultTokenName names the single token of Config.Token (--api-token
// or <data-dir>/api-token) in requested_by.
const DefaultTokenName = "default"

// tokenName is what a token's name may be.
var tokenName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// Tokens are the API tokens by name. Set replaces them all at once (a
// reload); a token removed is refused from the next request on. Safe for
// concurrent use.
type Tokens struct {
	mu sync.RWMutex
	// byHash maps a token's SHA-256 to its name: a lookup compares
	// hashes, so its timing tells nothing of a token.
	byHash map[[32]byte]string
}

// NewTokens returns the tokens of byName (name → token), checked as Set does.
func NewTokens(byName map[string]string) (*Tokens, error) {
	t := &Tokens{}
	if err := t.Set(byName); err != nil {
		return nil, err
	}
	return t, nil
}

// Set replaces the tokens with byName; a bad name or a short or repeated
// token changes nothing.
func (t *Tokens) Set(byName map[string]string) error {
	m := make(map[[32]byte]string, len(byName))
	for name, tok := range byName {
		if !tokenName.MatchString(name) {
			return fmt.Errorf("token name %q: want letters, digits, '.', '_' or '-', at most 64", name)
		}
		if err := CheckToken(tok); err != nil {
			return fmt.Errorf("token %q: %w", name, err)
		}
		h := sha256.Sum256([]byte(tok))
		if other, dup := m[h]; dup {
			return fmt.Errorf("tokens %q and %q are the same", other, name)
		}
		m[h] = name
	}
	t.mu.Lock()
	t.byHash = m
	t.mu.Unlock()
	return nil
}

// Lookup returns the name of token, ok false when it is not one.
func (t *Tokens) Lookup(token string) (name string, ok bool) {
	h := sha256.Sum256([]byte(token))
	t.mu.RLock()
	defer t.mu.RUnlock()
	name, ok = t.byHash[h]
	return name, ok
}

// Len is how many tokens there are.
func (t *Tokens) Len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.byHash)
}

// ParseTokens reads an --api-tokens-file: one name:token per line; blank
// lines and lines starting with # are skipped.
func ParseTokens(r io.Reader) (map[string]string, error) {
	out := map[string]string{}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, tok, ok := strings.Cut(line, ":")
		name, tok = strings.TrimSpace(name), strings.TrimSpace(tok)
		if !ok || name == "" || tok == "" {
			return nil, fmt.Errorf("line %d: want name:token", n)
		}
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("line %d: token name %q given twice", n, name)
		}
		out[name] = tok
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// requester is requested_by of a REST request: api-token:<name>@<client
// address>, or loopback@<client address> for one without a token.
func requester(r *http.Request, tokenName string) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	if tokenName == "" {
		return "loopback@" + host
	}
	return "api-token:" + tokenName + "@" + host
}
