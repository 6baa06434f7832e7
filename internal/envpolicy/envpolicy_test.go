package envpolicy

import (
	"strings"
	"testing"
)

func TestDeniedEnv(t *testing.T) {
	tests := []struct {
		name   string
		denied bool
		reason string // substring of the reason
	}{
		{"LD_PRELOAD", true, "dynamic linker"},
		{"LD_LIBRARY_PATH", true, "dynamic linker"},
		{"LD_AUDIT", true, "dynamic linker"},
		{"LD_", true, "dynamic linker"},
		{"GLIBC_TUNABLES", true, "CVE-2023-4911"},
		{"GCONV_PATH", true, "gconv"},
		{"GETCONF_DIR", true, "getconf"},
		{"HOSTALIASES", true, "host aliases"},
		{"LOCALDOMAIN", true, "resolver"},
		{"RES_OPTIONS", true, "resolver"},
		{"LOCPATH", true, "locale"},
		{"NLSPATH", true, "catalogs"},
		{"TZDIR", true, "time zone"},
		{"MALLOC_TRACE", true, "trace file"},
		{"PATH", true, "programs"},
		{"OPENSSL_CONF", true, "engines"},
		{"CUDA_INJECTION64_PATH", true, "CUDA"},
		{"PYTHONPATH", true, "interpreter"},
		{"PYTHONSTARTUP", true, "interpreter"},
		{"PYTHONHOME", true, "interpreter"},
		{"PYTHONUNBUFFERED", true, "interpreter"}, // the prefix rule: all of them
		{"NODE_OPTIONS", true, "--require"},
		{"NODE_PATH", true, "interpreter"},
		{"PERL5LIB", true, "PERL5LIB"},
		{"PERL5OPT", true, "interpreter"},
		{"PERLLIB", true, "interpreter"},
		{"RUBYOPT", true, "interpreter"},
		{"RUBYLIB", true, "interpreter"},
		{"LUA_INIT_5_4", true, "interpreter"},
		{"JAVA_TOOL_OPTIONS", true, "javaagent"},
		{"_JAVA_OPTIONS", true, "javaagent"},
		{"JDK_JAVA_OPTIONS", true, "javaagent"},
		{"BASH_ENV", true, "shell"},
		{"ENV", true, "shell"},
		{"BASH_FUNC_ls%%", true, "exported functions"},
		{"IFS", true, "split"},
		{"PS4", true, "xtrace"},
		// Allowed: ordinary tuning and look-alikes of denied names.
		{"MALLOC_ARENA_MAX", false, ""},
		{"OMP_NUM_THREADS", false, ""},
		{"LLAMA_ARG_THREADS", false, ""},
		{"HF_HUB_OFFLINE", false, ""},
		{"TMPDIR", false, ""},
		{"ld_preload", false, ""}, // the loader reads the upper-case name only
		{"XLD_PRELOAD", false, ""},
		{"ENVIRONMENT", false, ""},
		{"MY_PATH", false, ""},
		{"PATHS", false, ""},
		{"NODE_ENV", false, ""},
		{"", false, ""},
	}
	for _, tc := range tests {
		denied, reason := DeniedEnv(tc.name)
		if denied != tc.denied {
			t.Errorf("DeniedEnv(%q) = %v (%q), want %v", tc.name, denied, reason, tc.denied)
			continue
		}
		if tc.denied && (!strings.Contains(reason, tc.reason) || !strings.HasPrefix(reason, tc.name+" ")) {
			t.Errorf("DeniedEnv(%q) reason %q, want it to name the variable and contain %q", tc.name, reason, tc.reason)
		}
		if !tc.denied && reason != "" {
			t.Errorf("DeniedEnv(%q) gave a reason %q for an allowed name", tc.name, reason)
		}
	}
}
