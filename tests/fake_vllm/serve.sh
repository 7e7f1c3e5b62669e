#!/bin/sh
# One HTTP request of the fake vLLM server, on stdin/stdout (run per connection by `nc -ll -e`).
#
#   GET  any file under /www    (/health, /v1/models, /fake/args, /fake/env, /fake/last_request)
#   POST /v1/chat/completions   streamed (SSE, usage chunk, [DONE]) or not, as vLLM answers:
#        the reply is "echo: <words of the last user message>", one word per token, at most
#        max_tokens / max_completion_tokens words (then finish_reason "length");
#        with "tools" and a last user message "call NAME {json}": a tool call NAME(json) in vLLM's
#        delta form (name first, arguments in pieces), finish_reason "tool_calls".
#   POST /v1/completions        the prompt's words, reversed, one per token.
# FAKE_VLLM_TOKEN_DELAY_S=N sleeps between tokens. Strings are the tests' own: no JSON escaping here.
WWW=${FAKE_VLLM_WWW:-/www}
CR=$(printf '\r')
read -r method path proto
path=${path%%\?*}
path=${path%"$CR"}
cl=0
while read -r line; do
  line=${line%"$CR"}
  [ -z "$line" ] && break
  case "$line" in
    [Cc]ontent-[Ll]ength:*) cl=${line#*:}; cl=$((cl + 0)) ;;
  esac
done

reply() {  # status, content type, body
  printf 'HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
    "$1" "$2" "${#3}" "$3"
}

if [ "$method" = "GET" ] || [ "$method" = "HEAD" ]; then
  case "$path" in *..*) reply "400 Bad Request" text/plain "bad path"; exit 0 ;; esac
  if [ -f "$WWW$path" ]; then
    body=$(cat "$WWW$path")
    case "$path" in /v1/*) ct=application/json ;; *) ct=text/plain ;; esac
    reply "200 OK" "$ct" "$body"
  else
    reply "404 Not Found" text/plain "not found"
  fi
  exit 0
fi

body=""
[ "$cl" -gt 0 ] && body=$(head -c "$cl")
printf '%s' "$body" > "$WWW/fake/last_request"

field() {  # the first "name": value (number or true/false) in the body
  printf '%s' "$body" | sed -n "s/.*\"$1\" *: *\([0-9a-z]*\).*/\1/p" | head -n 1
}
stream=$(field stream)
max=$(field max_completion_tokens)
[ -z "$max" ] && max=$(field max_tokens)
[ -z "$max" ] && max=100000
usage=$(field include_usage)
model=$(printf '%s' "$body" | sed -n 's/.*"model" *: *"\([^"]*\)".*/\1/p' | head -n 1)
created=$(date +%s)
id="cmpl-fake$$"
delay=${FAKE_VLLM_TOKEN_DELAY_S:-0}

case "$path" in
  /v1/chat/completions)
    kind=chat
    # the last "content": "..." of a user message (the tests' messages hold no escaped quotes)
    text=$(printf '%s' "$body" | sed 's/"role" *: *"/\n&/g' | grep '^"role" *: *"user"' | tail -n 1 \
           | sed -n 's/.*"content" *: *"\(\([^"\\]\|\\.\)*\)".*/\1/p')
    ;;
  /v1/completions)
    kind=text
    text=$(printf '%s' "$body" | sed -n 's/.*"prompt" *: *"\([^"]*\)".*/\1/p' | head -n 1)
    ;;
  *) reply "404 Not Found" application/json '{"error":{"message":"not found","type":"not_found","code":404}}'
     exit 0 ;;
esac

tool=""
if [ "$kind" = chat ] && printf '%s' "$body" | grep -q '"tools" *: *\['; then
  case "$text" in "call "*) rest=${text#call }; tool=${rest%% *}; args=${rest#"$tool"}; args=${args# } ;; esac
fi

pieces=""
if [ "$kind" = chat ]; then
  pieces="echo:"
  for w in $text; do pieces="$pieces $w"; done
else
  for w in $text; do pieces="$w $pieces"; done
fi

chunk() {  # delta-or-text JSON, finish_reason JSON
  if [ "$kind" = chat ]; then
    printf 'data: {"id":"%s","object":"chat.completion.chunk","created":%s,"model":"%s","choices":[{"index":0,"delta":%s,"logprobs":null,"finish_reason":%s}]}\n\n' \
      "$id" "$created" "$model" "$1" "$2"
  else
    printf 'data: {"id":"%s","object":"text_completion","created":%s,"model":"%s","choices":[{"index":0,"text":%s,"logprobs":null,"finish_reason":%s}]}\n\n' \
      "$id" "$created" "$model" "$1" "$2"
  fi
}

n=0; out=""; finish=stop
if [ "$stream" = true ]; then
  printf 'HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nConnection: close\r\n\r\n'
  [ "$kind" = chat ] && chunk '{"role":"assistant","content":""}' null
  if [ -n "$tool" ]; then
    chunk "{\"tool_calls\":[{\"index\":0,\"id\":\"chatcmpl-tool-fake$$\",\"type\":\"function\",\"function\":{\"name\":\"$tool\",\"arguments\":\"\"}}]}" null
    chunk "{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"$args\"}}]}" null
    n=3; finish=tool_calls
  else
    first=1
    for w in $pieces; do
      if [ "$n" -ge "$max" ]; then finish=length; break; fi
      [ "$delay" != 0 ] && sleep "$delay"
      if [ "$first" = 1 ]; then piece="$w"; first=0; else piece=" $w"; fi
      if [ "$kind" = chat ]; then chunk "{\"content\":\"$piece\"}" null; else chunk "\"$piece\"" null; fi
      n=$((n + 1))
    done
  fi
  if [ "$kind" = chat ]; then chunk '{}' "\"$finish\""; else chunk '""' "\"$finish\""; fi
  if [ "$usage" = true ]; then
    printf 'data: {"id":"%s","object":"chat.completion.chunk","created":%s,"model":"%s","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":%s,"total_tokens":%s}}\n\n' \
      "$id" "$created" "$model" "$n" "$((n + 7))"
  fi
  printf 'data: [DONE]\n\n'
  exit 0
fi

first=1
for w in $pieces; do
  if [ "$n" -ge "$max" ]; then finish=length; break; fi
  if [ "$first" = 1 ]; then out="$w"; first=0; else out="$out $w"; fi
  n=$((n + 1))
done
use="{\"prompt_tokens\":7,\"completion_tokens\":$n,\"total_tokens\":$((n + 7))}"
if [ -n "$tool" ]; then
  msg="{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"chatcmpl-tool-fake$$\",\"type\":\"function\",\"function\":{\"name\":\"$tool\",\"arguments\":\"$args\"}}]}"
  resp="{\"id\":\"$id\",\"object\":\"chat.completion\",\"created\":$created,\"model\":\"$model\",\"choices\":[{\"index\":0,\"message\":$msg,\"logprobs\":null,\"finish_reason\":\"tool_calls\"}],\"usage\":$use}"
elif [ "$kind" = chat ]; then
  resp="{\"id\":\"$id\",\"object\":\"chat.completion\",\"created\":$created,\"model\":\"$model\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"$out\"},\"logprobs\":null,\"finish_reason\":\"$finish\"}],\"usage\":$use}"
else
  resp="{\"id\":\"$id\",\"object\":\"text_completion\",\"created\":$created,\"model\":\"$model\",\"choices\":[{\"index\":0,\"text\":\"$out\",\"logprobs\":null,\"finish_reason\":\"$finish\"}],\"usage\":$use}"
fi
reply "200 OK" application/json "$resp"
