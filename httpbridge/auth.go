package httpbridge

import (
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/netaddr"
)

// MinTokenLength is the shortest API token volumed takes.
const MinTokenLength = 16

// CheckToken reports an API token shorter than MinTokenLength.
func CheckToken(token string) error {
	if len(token) < MinTokenLength {
		return fmt.Errorf("the API token must have at least %d characters", MinTokenLength)
	}
	return nil
}

// openRoutes answer without a token, anywhere.
var openRoutes = map[string]bool{BasePath + "/health": true, BasePath + "/openapi.json": true}

// guard refuses cross-site requests, then requests without the right
// bearer token: off loopback every route but the open ones needs it; on
// loopback a request may come without one (from a loopback Host, so a
// rebound DNS name cannot use it), but a token it carries must be right.
func (s *Server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := crossSite(r); err != nil {
			writeError(w, err)
			return
		}
		if !openRoutes[r.URL.Path] {
			name, err := s.authenticate(r)
			if err != nil {
				if err.Status == http.StatusUnauthorized {
					w.Header().Set("WWW-Authenticate", `Bearer realm="volumed"`)
				}
				writeError(w, err)
				return
			}
			r = r.WithContext(commands.WithRequester(r.Context(), requester(r, name)))
		}
		next.ServeHTTP(w, r)
	})
}

// authenticate checks the request's bearer token and returns its name,
// "" for a request without one on loopback.
func (s *Server) authenticate(r *http.Request) (string, *commands.Error) {
	h := r.Header.Get("Authorization")
	if h == "" {
		switch {
		case s.requireToken:
			return "", commands.Unauthorized("an API token is required: Authorization: Bearer <token>")
		case !loopbackHost(r.Host):
			return "", commands.Forbidden("Host %q is not a loopback name: send the API token", commands.Shown(r.Host, 80))
		}
		return "", nil
	}
	scheme, token, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", commands.Unauthorized("the Authorization header must be Bearer <token>")
	}
	token = strings.TrimSpace(token)
	if s.cfg.Token != "" && tokenEqual(token, s.cfg.Token) {
		return DefaultTokenName, nil
	}
	if s.cfg.Tokens != nil {
		if name, ok := s.cfg.Tokens.Lookup(token); ok {
			return name, nil
		}
	}
	return "", commands.Unauthorized("the API token is wrong")
}

// tokenEqual compares two tokens in constant time (their hashes, so the
// length does not show either).
func tokenEqual(a, b string) bool {
	ha, hb := sha256.Sum256([]byte(a)), sha256.Sum256([]byte(b))
	return subtle.ConstantTimeCompare(ha[:], hb[:]) == 1
}

// loopbackHost reports whether a Host header names loopback.
func loopbackHost(hostport string) bool {
	if _, _, err := net.SplitHostPort(hostport); err != nil {
		hostport = net.JoinHostPort(strings.Trim(hostport, "[]"), "0")
	}
	return netaddr.IsLoopback(hostport)
}

// crossSite refuses a request a browser sent for another site: a
// Sec-Fetch-Site other than same-origin or none, or an Origin other than
// the request's own scheme and host (including "null").
func crossSite(r *http.Request) *commands.Error {
	switch site := r.Header.Get("Sec-Fetch-Site"); site {
	case "", "same-origin", "none":
	default:
		return commands.Forbidden("cross-site request refused (Sec-Fetch-Site: %s)", commands.Shown(site, 40))
	}
	origin := r.Header.Get("Origin")
	if origin == "" {
		return nil
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	u, err := url.Parse(origin)
	if err != nil || u.Scheme != scheme || u.Host == "" || !strings.EqualFold(u.Host, r.Host) {
		return commands.Forbidden("cross-site request refused (Origin %s)", commands.Shown(origin, 80))
	}
	return nil
}
