% rebase('base.tpl', title=title, session=session)
<form class="login" method="post" action="/dashboard/login">
  % if message:
  <p class="error" id="login-error">{{message}}</p>
  % end
  <label for="key">API key</label>
  <input type="password" id="key" name="key" autocomplete="off" autofocus required>
  <input type="hidden" name="csrf" value="{{csrf}}">
  <button type="submit" id="sign-in">Sign in</button>
  <p class="hint">A key is made with <code>postbox manage key --add NAME</code>; a site key (<code>--site</code>) sees every job.</p>
</form>
